"""Built-in amalgamation algorithms (registered through the plugin hooks)."""
