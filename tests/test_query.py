"""The client's readiness wait: it must keep polling through TorchServe's start-up, never crash on it."""

import pytest

from query import ServerUnreachable, wait_until_ready
from ts_server import free_ports


@pytest.mark.parametrize("content", [None, "", '{"management": '])  # absent, created-but-empty, half-written
def test_wait_until_ready_polls_through_a_key_file_being_written(tmp_path, content):
    key_file = tmp_path / "key_file.json"
    if content is not None:
        key_file.write_text(content)
    [port] = free_ports(1)  # nothing listens there: the wait must end with its own error, not a JSON one
    with pytest.raises(ServerUnreachable, match="not ready after"):
        wait_until_ready(f"http://127.0.0.1:{port}", "stable-diffusion", key_file, timeout=1.5)
