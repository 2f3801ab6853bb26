"""``python -m llmq {export,compile,eval} ...`` — the console scripts without needing them on PATH."""

import sys

from .cli import compile_main, eval_main, export_main

COMMANDS = {"export": export_main, "compile": compile_main, "eval": eval_main}

if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    print(f"usage: python -m llmq {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
    sys.exit(2)
sys.exit(COMMANDS[sys.argv[1]](sys.argv[2:]))
