"""peer-venv/bin/python scripts/peer_epoch_model.py CHECKPOINT.pt OUT.model AVG_NUM_NEIGHBORS Z1,Z2,..  — the mace-torch
ScaleShiftMACE of one kept epoch checkpoint of mace_run_train (EMA weights, as mace_run_train saves them), rebuilt
at the reference size (mace_s: 32x0e+32x1o, max_ell 3, correlation 3, 2 layers, radial MLP [64,64,64], 16x0e readout)
with scripts/peer_mace.py's build_model (mace_run_train's construction) and saved as a .model file. E0s, scale and shift
are buffers and come from the checkpoint; avg_num_neighbors is not, so it is passed (mace_run_train's log line)."""
import os, sys
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
torch.set_default_dtype(torch.float64)
import bench_common as bc
import peer_mace
zs = [int(z) for z in sys.argv[4].split(",")]
model = peer_mace.build_model(bc.REFERENCE_HP, zs, {}, float(sys.argv[3]), 1.0, 0.0)
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)["model"]
own = model.state_dict()
for k, v in state.items():  # mace_run_train's multi-head layout ([1, n] E0s) → the single-head model's shape
    if k in own and v.shape != own[k].shape and v.numel() == own[k].numel():
        state[k] = v.reshape(own[k].shape)
missing = model.load_state_dict(state, strict=True)
torch.save(model.double(), sys.argv[2])
print("wrote", sys.argv[2], missing)
