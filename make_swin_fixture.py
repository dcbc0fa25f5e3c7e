"""Write ``swin_fixture.pt``: reference outputs of the Swin UNETR encoder of MONAI 1.4 for the tests.

This is the only file of the project that imports MONAI; run it in a separate environment::

    python -m venv /tmp/monai_env && /tmp/monai_env/bin/pip install torch==2.13.0 monai==1.4.0 einops numpy
    /tmp/monai_env/bin/python make_swin_fixture.py

Two small seeded models with random weights (relative position bias tables included, which MONAI
initialises near zero, so that the bias matters in the comparison):

* ``w4``: window 4, feature size 12, 4 input channels, input ``(1, 4, 32, 32, 32)``; saved as a full
  SwinUNETR state dict (small decoder tensors included) under "state_dict", like the BraTS
  checkpoints. Holds the expected outputs for the 4-channel input and for a 1-channel input copied
  into all 4 channels.
* ``w7``: window 7 (as the published weights), feature size 12, 1 input channel, input
  ``(1, 1, 64, 32, 32)``: padding to whole windows, shifted-window masks over padding, a stage
  shifted along one axis only (window 7x4x4) and a last stage whose window shrinks to 4x2x2.
  Saved as the ``swinViT.*`` part only, without the ``relative_position_index`` buffers (7.5 MB of
  int64 that the encoder computes itself).

Outputs are ``model.swinViT(x, normalize=True)``, five float32 maps per case.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from monai.networks.nets import SwinUNETR
from monai.networks.nets.swin_unetr import SwinTransformer

DECODER_LIMIT = 5_000


def reference_encoder(feature_size: int, window_size: int) -> torch.nn.Module:
    """MONAI 1.4's SwinTransformer configured like ``swin_encoder.SwinEncoder(1, feature_size, window_size)``
    (used by ``bench.py encoder`` for the side-by-side timing)."""
    return SwinTransformer(in_chans=1, embed_dim=feature_size, window_size=(window_size,) * 3,
                           patch_size=(2,) * 3, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                           downsample="merging")


def randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Seeded random values for every parameter, scaled so each layer matters in the outputs."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("relative_position_bias_table"):
                param.copy_(noise)
            elif param.dim() == 1 and ("norm" in name.split(".")[-2]):
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            elif param.dim() == 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)


def swin_unetr(in_channels: int, feature_size: int, window: int) -> SwinUNETR:
    """A SwinUNETR whose encoder uses ``window`` (SwinUNETR itself always builds window 7)."""
    model = SwinUNETR(img_size=(32, 32, 32), in_channels=in_channels, out_channels=2,
                      feature_size=feature_size)
    if window != 7:
        model.swinViT = SwinTransformer(
            in_chans=in_channels, embed_dim=feature_size, window_size=(window,) * 3, patch_size=(2, 2, 2),
            depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), downsample="merging")
    return model.eval()


def make_case(seed: int, in_channels: int, window: int, shape: tuple, full_state: bool) -> dict:
    generator = torch.Generator().manual_seed(seed)
    model = swin_unetr(in_channels, 12, window)
    randomise(model, generator)
    x = torch.rand((1, in_channels) + shape, generator=generator)
    with torch.no_grad():
        outputs = [o.contiguous() for o in model.swinViT(x, normalize=True)]
    if full_state:  # decoder tensors over DECODER_LIMIT elements are left out to keep the file small
        state = {k: v for k, v in model.state_dict().items()
                 if k.startswith("swinViT.") or v.numel() <= DECODER_LIMIT}
    else:  # the index buffers are left out: the loader must then use the encoder's own
        state = {f"swinViT.{k}": v for k, v in model.swinViT.state_dict().items()
                 if "relative_position_index" not in k}
    case = {"window": window, "feature_size": 12, "in_channels": in_channels, "input": x,
            "checkpoint": {"state_dict": {k: v.clone() for k, v in state.items()}}, "outputs": outputs}
    if in_channels > 1:
        single = x[:, :1]
        with torch.no_grad():
            case["single_channel_input"] = single
            case["single_channel_outputs"] = [
                o.contiguous() for o in model.swinViT(single.repeat(1, in_channels, 1, 1, 1), normalize=True)]
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "swin_fixture.pt")
    args = parser.parse_args()
    torch.manual_seed(0)
    fixture = {"w4": make_case(101, 4, 4, (32, 32, 32), full_state=True),
               "w7": make_case(202, 1, 7, (64, 32, 32), full_state=False)}
    tmp = args.out.with_suffix(".tmp")
    torch.save(fixture, tmp)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
