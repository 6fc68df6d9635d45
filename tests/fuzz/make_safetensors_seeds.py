# Writes the seed corpus of safetensors_fuzz with the Python safetensors package (the real
# writer): python tests/fuzz/make_safetensors_seeds.py tests/fuzz/safetensors_fuzz
import sys

import numpy as np
from safetensors.numpy import save_file as save

out = sys.argv[1]
rng = np.random.default_rng(0)
save({"w": rng.standard_normal((4, 3)).astype(np.float32),
      "b": np.arange(5, dtype=np.int64),
      "m": np.array([True, False, True]),
      "h": np.ones((2, 2), dtype=np.float16)},
     f"{out}/mixed.safetensors", metadata={"format": "pt", "note": "seed"})
save({"e": np.zeros((0, 3), dtype=np.float32), "s": np.array(7, dtype=np.uint8)},
     f"{out}/empty_and_scalar.safetensors")
save({}, f"{out}/no_tensors.safetensors")
save({"c": np.arange(4, dtype=np.complex64), "u": np.arange(6, dtype=np.uint16).reshape(2, 3)},
     f"{out}/complex_unsigned.safetensors", metadata={"DCP_SHARDING_INFO":
     '{"c": {"saved_offsets": [4]}, "u": {"saved_offsets": [0, 3]}}', "DCP_VERSION": "1.0"})
