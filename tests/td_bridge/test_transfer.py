"""The transfers between rings and a real engine (random:tiny on the CPU), and the gather indices the CUDA
transfer uses for pixel format and row order, checked here on CPU tensors against the ring client."""

import numpy as np
import pytest
import torch

from td_bridge.ring import PixelFormat, RingLayout, RingReader, RingWriter, RowOrder, to_rgb
from td_bridge.transfer import HostTransfer, input_index, output_index, make_transfer


@pytest.mark.parametrize("fmt", list(PixelFormat))
@pytest.mark.parametrize("rows", list(RowOrder))
def test_cuda_gather_indices_match_the_ring_client(shm_name, fmt, rows):
    lay = RingLayout(7, 5, fmt, rows, 2)
    rgb = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # top-down RGB
    with RingWriter.create(shm_name, lay) as w, RingReader.attach(shm_name) as r:
        w.write(rgb)
        raw = r.empty_frame()
        r.read(raw)
    # upload: ring layout -> engine RGB, one gather
    engine_rgb = torch.gather(torch.from_numpy(raw).view(-1), 0, input_index(lay)).view(5, 7, 3)
    assert np.array_equal(engine_rgb.numpy(), rgb)
    # readback: engine RGB -> ring layout (alpha filled separately), one gather
    ring3 = torch.gather(torch.from_numpy(rgb).reshape(-1), 0, output_index(lay)).view(5, 7, 3).numpy()
    assert np.array_equal(ring3, raw[..., :3])


def test_host_transfer_publishes_exactly_what_the_engine_makes(shm_name):
    """Two identically seeded engines: one behind the rings, one called directly with the same frames. The
    bridge's output ring must hold the direct engine's outputs, byte for byte, upright and in RGB order."""
    from rtdiffusion import StreamEngine

    def make():
        return StreamEngine.from_pretrained("random:tiny", width=64, height=64, t_index_list=[32], cfg="none",
                                            device="cpu", dtype="float32", seed=2, backend="auto")

    engine, twin = make(), make()
    lay = RingLayout(64, 64, PixelFormat.BGRA8, RowOrder.BOTTOM_UP, 3)
    bridge_in, bridge_out = RingReader.create(shm_name + "i", lay), RingWriter.create(shm_name + "o", lay)
    published = []
    try:
        tr = make_transfer(engine, bridge_in, bridge_out, lambda n, s: published.append((n, s)))
        assert isinstance(tr, HostTransfer)
        with RingWriter.attach(bridge_in.name) as client_in, RingReader.attach(bridge_out.name) as client_out:
            assert tr.read() is None and not tr.has_input
            rng = np.random.default_rng(0)
            pics = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
            for p in pics:
                client_in.write(p)
            assert tr.read().index == 2  # only the newest frame is taken
            raw, rgb = client_out.empty_frame(), np.empty((64, 64, 3), np.uint8)
            for n in range(2):  # the second submit re-runs the same input (/process_frame while paused)
                tr.submit()
                assert tr.poll() == 1
                info = client_out.read(raw)
                assert (info.index, info.source_index) == (n, 2)
                assert np.array_equal(to_rgb(raw, lay, rgb), twin(pics[2]))
                assert (raw[..., 3] == 255).all()
            assert published == [(0, 2), (1, 2)]
    finally:
        bridge_in.close()
        bridge_out.close()

