"""GPU check step: the default network's logits on the GPU (TorchScript engine, TF32 off) vs the
CPU, on one batch of tiles. Prints the max abs difference per setting."""

import torch

from segserve.torchscript_network import TorchScriptNetwork, disable_tf32

PATH = "model_repository/unet2d_particles/1/model.ts"
tiles = torch.rand(8, 1, 128, 128, generator=torch.Generator().manual_seed(0))
cpu = torch.jit.load(PATH).eval()
with torch.no_grad():
    expected = cpu(tiles)
    torch.backends.cudnn.allow_tf32 = True
    default_gpu = torch.jit.load(PATH, map_location="cuda").eval()(tiles.cuda()).cpu()
engine = TorchScriptNetwork(PATH, torch.device("cuda"))
print(f"logits |gpu - cpu|: torch defaults {(default_gpu - expected).abs().max():.3g}, "
      f"engine (TF32 off) {(engine(tiles.cuda()).cpu() - expected).abs().max():.3g}")
disable_tf32()
