"""``python -m dedit_nb.memory``: the predicted peak of each phase, as a table."""
from .workload import estimate


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m dedit_nb.memory", description=estimate.__doc__.split(".")[0])
    parser.add_argument("--model", default="sd15", help="sd15, sd21, sdxl or a local diffusers folder")
    parser.add_argument("--resolution", type=int, default=512, help="side of the square working image, pixels")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--mode", default="attention", choices=["attention", "lora"],
                        help="stage 2 trains the cross-attention q/k/v (attention) or a LoRA")
    parser.add_argument("--lora", action="store_true", help="same as --mode lora")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--capability", default="7.5", help="the GPU's compute capability (T4 7.5, L4 8.9, A100 8.0)")
    a = parser.parse_args(argv)
    capability = tuple(int(x) for x in a.capability.split("."))
    print(estimate(a.model, a.resolution, a.dtype, lora=a.lora or a.mode == "lora",
                   gradient_checkpointing=a.gradient_checkpointing, batch_size=a.batch_size, items=a.items,
                   guidance=a.guidance, capability=capability, vae_tiling=a.vae_tiling).table())


if __name__ == "__main__":
    main()
