"""Many viewers at once: concurrent frame renders through the API give the images lone renders give."""

from __future__ import annotations

import io
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from test_viewer import CT, MR, api, sop_of

from mi2b2.api.app import create_app
from mi2b2.services.context import build_context
from mi2b2.testing import FakeClock
from support.site import load_site
from support.viewing import Cached, fill, serving


def _jobs(cached: Cached) -> list[tuple[str, int, str]]:
    """Different studies, formats, frames and windows: (SOP UID, frame, query)."""
    clip, j2k = sop_of(cached, "examples_ybr_color.dcm"), sop_of(cached, "JPEG2000.dcm")
    jobs = [(sop, 1, "") for sop in (MR, CT, j2k)]
    jobs += [(CT, 1, "preset=lung"), (MR, 1, "center=300&width=50")]
    jobs += [(clip, frame, "") for frame in (1, 7, 15, 22, 30)]
    return jobs


def _render(client: httpx.Client, job: tuple[str, int, str]) -> tuple[tuple[int, ...], bytes]:
    sop, frame, query = job
    response = client.get(f"{api()}/instances/{sop}/frames/{frame}.png?{query}")
    assert response.status_code == 200, response.text
    image = np.asarray(Image.open(io.BytesIO(response.content)))
    return image.shape, image.tobytes()


def test_concurrent_renders_through_the_api_match_lone_renders(tmp_path: Path) -> None:
    ctx = build_context(load_site(tmp_path / "site"), clock=FakeClock())
    cached = fill(ctx, tmp_path / "files")
    jobs = _jobs(cached)
    # Two apps, so the crowd decodes afresh instead of reading the frames the lone renders left in memory.
    with serving(create_app(ctx)) as url, httpx.Client(base_url=url, headers=cached.headers("alice"),
                                                        timeout=120) as client:
        alone = {job: _render(client, job) for job in jobs}
    crowd = jobs * 3
    random.Random(9).shuffle(crowd)
    with serving(create_app(ctx)) as url, httpx.Client(base_url=url, headers=cached.headers("alice"), timeout=120,
                                                        limits=httpx.Limits(max_connections=16)) as client, \
            ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda job: _render(client, job), crowd))
    for job, result in zip(crowd, together, strict=True):
        assert result == alone[job], job
