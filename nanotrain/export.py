"""Export to, and import from, Hugging Face's Llama format (the library is hf/convert.py; docs/10).

    python -m nanotrain.export --checkpoint CKPT --format hf --out DIR         # nanotrain -> HF
    python -m nanotrain.export --hf DIR --format nanotrain --out CKPT         # HF -> nanotrain
"""

from __future__ import annotations

import argparse
import sys

from nanotrain.checkpoint.inference import find_checkpoint
from nanotrain.errors import ArgumentParser, ExportError, exit_on_error
from nanotrain.hf.convert import export_hf, import_hf


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m nanotrain.export",
        description="Convert between nanotrain checkpoints and Hugging Face Llama directories.",
        epilog="export: --checkpoint CKPT --format hf --out DIR;  import: --hf DIR --format nanotrain --out CKPT",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="nanotrain checkpoint directory to export")
    source.add_argument("--hf", help="Hugging Face Llama directory (config.json, *.safetensors) to import")
    parser.add_argument("--format", choices=("hf", "nanotrain"),
                        help="format to write (default: the other one: hf for --checkpoint, nanotrain for --hf)")
    parser.add_argument("--out", required=True, help="output directory (must not exist yet)")
    return parser


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    wanted = args.format or ("hf" if args.checkpoint else "nanotrain")
    if args.checkpoint and wanted == "hf":
        print(f"wrote Hugging Face LlamaForCausalLM directory {export_hf(find_checkpoint(args.checkpoint), args.out)}")
    elif args.hf and wanted == "nanotrain":
        print(f"wrote nanotrain checkpoint {import_hf(args.hf, args.out)}")
    else:
        given = "--checkpoint (a nanotrain checkpoint)" if args.checkpoint else "--hf (an HF directory)"
        raise ExportError(f"{given} cannot be written as --format {wanted}: it already is that format")


if __name__ == "__main__":
    main()
