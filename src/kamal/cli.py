"""The ``kamal`` command line. Parsing and printing only; the work happens in kamal.run,
kamal.supervised and kamal.model_eval.

Heavy modules (torch) are imported inside commands, so ``kamal --help`` and
``kamal list-plugins`` stay fast.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import click

from . import __version__
from .errors import Interrupted, KamalError
from .version import CORE_DISTRIBUTION


class _Group(click.Group):
    """Turns :class:`KamalError` into a one-line message unless ``--debug``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KamalError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(exc, Interrupted):
                if os.environ.get("RANK", "0") == "0":  # torchrun: the main process says it once
                    click.echo(f"kamal: {exc}", err=True)
                ctx.exit(130)
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="kamal")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """kamal: merge several teacher networks into one student, without labels."""
    ctx.obj = {"debug": debug}
    if not debug:  # a warning is one line for the user, not a source location
        warnings.formatwarning = _one_line_warning


def _one_line_warning(message: Warning | str, category: type[Warning], *_: object,
                      **__: object) -> str:
    return f"kamal: warning: {message}\n"


@main.command("list-plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--requirements", is_flag=True, help="Print name==version of installed plugins.")
def list_plugins(as_json: bool, requirements: bool) -> None:
    """List plugins, what each provides, and any that failed to load."""
    from .plugins import plugin_infos

    infos = plugin_infos()
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    if requirements:
        for info in infos:
            if info.distribution != CORE_DISTRIBUTION:
                click.echo(f"{info.distribution}=={info.version}")
        return
    for info in infos:
        status = ("ok" if info.error is None else
                  f"{'INCOMPATIBLE' if info.incompatible else 'ERROR'}: {info.error}")
        click.echo(f"{info.name} ({info.distribution} {info.version}) [{status}]")
        for kind, names in sorted(info.provides.items()):
            click.echo(f"    {kind}: {', '.join(names)}")


def _print_report(report: dict[str, Any]) -> None:
    from .report import format_table

    if report:  # empty in the non-main processes of a distributed run
        click.echo(format_table(report))


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a config value (repeatable), e.g. --set train.epochs=5.")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Run folder (default: runs/<config name>).")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def amalgamate(config: str, overrides: tuple[str, ...], output: str | None, resume: bool,
               quiet: bool) -> None:
    """Amalgamate the teachers of CONFIG into a student and print the report."""
    from .run import amalgamate as run_amalgamate

    report = run_amalgamate(config, output, list(overrides), resume, progress=not quiet)
    _print_report(report)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a config value (repeatable).")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Run folder (default: runs/<config name>); the model repo is OUTPUT/model.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress output.")
def train(config: str, overrides: tuple[str, ...], output: str | None, resume: bool,
          quiet: bool) -> None:
    """Supervised training of one model (teachers, supervised references)."""
    from .supervised import train as run_train

    _print_report(run_train(config, output, list(overrides), resume, progress=not quiet))


@main.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--data", required=True, metavar="DATASET[:SPLIT]",
              help="Labeled data, e.g. digits:test.")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Dataset option (repeatable), e.g. --option size=16.")
@click.option("--teachers", "with_teachers", is_flag=True,
              help="Also evaluate the teachers recorded in the student and their ensemble.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--device", default="auto", show_default=True)
def evaluate(model_dir: str, data: str, options: tuple[str, ...], with_teachers: bool,
             as_json: bool, device: str) -> None:
    """Metrics of a model repo (or a run folder's student) on labeled data."""
    import yaml

    from .model_eval import evaluate_repo
    from .report import format_table

    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"'{item}' is not KEY=VALUE", param_hint="--option")
        parsed[key] = yaml.safe_load(value)
    result = evaluate_repo(model_dir, data, parsed, with_teachers, device)
    click.echo(json.dumps(result, indent=2) if as_json else format_table(result))


@main.command()
@click.argument("ref", metavar="ORG/NAME[@REVISION]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def pull(ref: str, as_json: bool) -> None:
    """Download a model repo from the Hub, verify it, and summarise it."""
    from .hub_commands import format_pull
    from .hub_commands import pull as pull_repo

    summary = pull_repo(ref)
    click.echo(json.dumps(summary, indent=2) if as_json else format_pull(summary))


@main.command()
@click.argument("ref", metavar="FOLDER|hub:ORG/NAME[@REVISION]")
@click.option("--format", "format_name", help="Teacher format (default: detected).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(ref: str, format_name: str | None, as_json: bool) -> None:
    """Format, architecture, tasks, input spec, parameters and every layer's output shape."""
    from .inspection import format_inspection, inspect_repo

    info = inspect_repo(ref, format_name)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.argument("repo_id", metavar="ORG/NAME")
@click.option("--private", is_flag=True, help="Create the repo as private.")
@click.option("--branch", help="Upload to this branch (created when missing).")
def push(run_dir: str, repo_id: str, private: bool, branch: str | None) -> None:
    """Upload a run's student (config, weights, model card) to the Hub."""
    from .hub_commands import push as push_repo

    commit = push_repo(run_dir, repo_id, private=private, branch=branch)
    click.echo(f"pushed {run_dir} to {repo_id}@{commit}")


_PIP_ARGS = {"ignore_unknown_options": True, "allow_extra_args": True,
             "help_option_names": ["-h", "--help"]}


@main.command(context_settings=_PIP_ARGS)
@click.argument("args", nargs=-1, required=True, type=click.UNPROCESSED)
def install(args: tuple[str, ...]) -> None:
    """Install plugins with pip into kamal's environment: `kamal install sbm cfl`.

    Short names become kamal-plugin-NAME; pip's options pass through (-U, -e PATH,
    --find-links DIR, ...). Prints what the new plugins provide.
    """
    from .installer import describe_changes, expand, installed_plugins, pip

    before = installed_plugins()
    code = pip("install", expand(list(args)))
    if code != 0:
        raise click.ClickException(f"pip install failed (exit code {code}); nothing else changed")
    lines = describe_changes(before, installed_plugins())
    click.echo("\n".join(lines) if lines else "no plugin was added or changed")


@main.command(context_settings=_PIP_ARGS)
@click.argument("args", nargs=-1, required=True, type=click.UNPROCESSED)
def uninstall(args: tuple[str, ...]) -> None:
    """Uninstall plugins with pip: `kamal uninstall sbm -y` (short names as for install)."""
    from .installer import expand, pip

    code = pip("uninstall", expand(list(args)))
    if code != 0:
        raise click.ClickException(f"pip uninstall failed (exit code {code})")


@main.command("new-plugin")
@click.argument("name")
@click.option("--dir", "directory", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where to create kamal-plugin-NAME.")
def new_plugin(name: str, directory: str) -> None:
    """Create a ready-to-install plugin package kamal-plugin-NAME."""
    from .scaffold import new_plugin as write_plugin

    root = write_plugin(name, directory)
    # a path pip cannot mistake for a name on the index: absolute, or starting with ./
    where = str(root) if root.is_absolute() else f"./{root.as_posix().removeprefix('./')}"
    click.echo(f"created {root}\nnext:\n  pip install -e '{where}[test]'\n  kamal list-plugins\n"
               f"  pytest {where}/tests")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
