"""Test-session settings shared by every test."""

from __future__ import annotations

import os

# One intra-op thread, here and in the main.py / script processes the tests start (they inherit the
# environment), unless the caller chose a number. The test networks are tiny: on a 2-core machine that
# other jobs share, two threads mostly spin waiting for each other, and `make test` took 3.5 minutes
# instead of 25 s. One thread also makes float reductions run in a fixed order.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The test doubles in tests/ (tests.toy.ToyAutoencoder, ...) are built from configs: allowed on purpose,
# here and in the processes the tests start.
os.environ["LDM_ALLOW_TARGETS"] = ",".join(p for p in (os.environ.get("LDM_ALLOW_TARGETS", ""), "tests") if p)

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
