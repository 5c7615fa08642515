"""One rich console for all user-facing output, so tests and logs see the same text."""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """A warning the user must not miss (printed in bold yellow)."""
    console.print(f"[bold yellow]WARNING[/] {message}")


def info(message: str) -> None:
    console.print(message)
