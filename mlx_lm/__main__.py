"""``python -m mlx_lm <command> [args]`` runs ``mlx_lm.<command>``'s command line."""

import importlib
import sys

COMMANDS = ("convert", "generate", "cache_prompt", "server")


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m mlx_lm {{{','.join(COMMANDS)}}} [args]")
    command = sys.argv.pop(1)
    sys.argv[0] = f"mlx_lm.{command}"
    importlib.import_module(f"mlx_lm.{command}").main()


if __name__ == "__main__":
    main()
