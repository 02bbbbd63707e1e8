"""Complete prompts with a checkpoint: `python -m nanotrain.generate --checkpoint PATH --prompt "Once upon a time"`.

PATH is a checkpoint directory, or a run directory (or its checkpoints/ folder), whose newest
complete checkpoint is used and named on stderr. No prompt, or an empty one, samples from BOS.
Prompts are batched with left padding and decoded with a KV cache; temperature 0 is greedy,
otherwise top-k / top-p sampling from a seeded generator (same seed, same text). The decoding
itself lives in the library module inference/sampling.py, which the training loop uses too.
Chapter: docs/10-generation-and-export.md.
"""

from __future__ import annotations

import argparse
import sys

from nanotrain.errors import ArgumentParser, GenerationError, exit_on_error
from nanotrain.inference.sampling import check_device, check_sampling, complete

# ---- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m nanotrain.generate",
        description="Complete prompts with a trained nanotrain checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                        help="checkpoint directory (holds manifest.json), or a run directory or its "
                             "checkpoints/ folder: the newest complete checkpoint there")
    parser.add_argument("--prompt", action="append", default=argparse.SUPPRESS,
                        help="text to complete; repeat for several prompts (batched with left padding); "
                             "\"\" or none: one sample from the beginning of a document (BOS alone)")
    parser.add_argument("--max_new_tokens", type=int, default=100,
                        help="tokens to add; past the model's context each token sees the last context tokens")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same text")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible, else CPU), cpu, cuda, cuda:1, ...")
    return parser


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    # lazily: `--help` needs no checkpoint code
    from nanotrain.checkpoint.inference import find_checkpoint, load_inference

    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    prompts = getattr(args, "prompt", [""])
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    checkpoint = find_checkpoint(args.checkpoint)
    model, _, tokenizer = load_inference(checkpoint, device=check_device(args.device))
    if tokenizer is None:
        raise GenerationError(
            f"checkpoint '{checkpoint}' has no tokenizer.model or tokenizer.json (trained on data.source = 'random'?), "
            "so text prompts cannot be encoded"
        )
    texts = complete(model, tokenizer, prompts, args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for text in texts:
        print(text)
        if len(texts) > 1:
            print("---")


if __name__ == "__main__":
    main()
