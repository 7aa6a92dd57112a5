"""What stopping the forward pass after the hooked module saves, on the embedded model.

python -m bench.forward [--chunks 32] [--hookpoint model.layers.6.mlp]
"""

import argparse

from sae.forward_report import run_forward_report
from service.config import get_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--hookpoint", default="model.layers.6.mlp")
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--chunk-len", type=int, default=256)
    args = parser.parse_args()
    report = run_forward_report(
        args.model, get_settings().home, args.hookpoint, args.chunks, args.chunk_len
    )
    print(f"model {report.model} hookpoint {report.hookpoint} tokens {report.n_tokens}")
    print(f"full forward:      {report.tokens_per_s_full:8.0f} tokens/s")
    print(f"stopped early:     {report.tokens_per_s_truncated:8.0f} tokens/s")
    print(f"ratio:             {report.speedup:8.2f}x  (identical activations: {report.identical})")


if __name__ == "__main__":
    main()
