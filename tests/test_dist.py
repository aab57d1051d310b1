"""components.dist: the bounded collective wait (``SLOTCON_DDP_TIMEOUT_S``) and the one line for a lost peer."""
from __future__ import annotations

import pytest

from components import dist
from components.errors import UserError


def test_ddp_timeout_comes_from_the_environment_and_a_bad_value_is_one_line():
    assert dist.ddp_timeout_s({}) == dist.DEFAULT_DDP_TIMEOUT_S
    assert dist.ddp_timeout_s({"SLOTCON_DDP_TIMEOUT_S": "12.5"}) == 12.5
    for bad in ("0", "-3", "ten"):
        with pytest.raises(UserError, match="SLOTCON_DDP_TIMEOUT_S=.*positive number"):
            dist.ddp_timeout_s({"SLOTCON_DDP_TIMEOUT_S": bad})


def test_the_lost_peer_line_names_the_other_node_its_ranks_and_the_checkpoint():
    env = {"LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "0"}
    line = dist.lost_peer_message("connection closed by peer", step=3, checkpoint="step 2", env=env)
    assert line.startswith("another rank stopped answering at step 3")  # one process: no group, no other node
    assert "last checkpoint: step 2" in line and "re-run the same command on every node" in line
    assert dist.peer_lost(RuntimeError("Connection closed by peer")) is None  # no group: not a lost peer
