"""``python -m kamal`` (also the entry point under ``torchrun -m kamal``)."""

from .cli import main

if __name__ == "__main__":
    main()
