"""The viewer decodes in many threads at once, and each gets the image a lone render gives."""

from __future__ import annotations

import io
import random
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from test_render import FORMATS, sample

from mi2b2.adapters.dicom.render import describe, quiet, render_png


def _jobs() -> list[tuple[str, int]]:
    """Every format the viewer promises, and every frame of the multi-frame ones."""
    return [(name, index) for name, _columns, _rows, _mode, frames in FORMATS for index in range(frames)]


def _render(job: tuple[str, int]) -> tuple[bytes, tuple[int, int], str]:
    name, index = job
    rendered = render_png(sample(name), index)
    image = Image.open(io.BytesIO(rendered.png))
    return np.asarray(image).tobytes(), image.size, image.mode


def test_concurrent_renders_of_different_images_and_frames_match_lone_renders() -> None:
    jobs = _jobs()
    alone = {job: _render(job) for job in jobs}
    crowd = jobs * 4
    random.Random(12).shuffle(crowd)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(_render, crowd))
    assert len(together) == len(crowd)
    for job, result in zip(crowd, together, strict=True):
        assert result == alone[job], job


def test_one_thread_reading_does_not_hold_up_another() -> None:
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with quiet():
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        finished = threading.Event()
        reader = threading.Thread(target=lambda: (describe(sample("CT_small.dcm")), finished.set()))
        reader.start()
        assert finished.wait(10), "a read waited for another thread's"
        reader.join()
    finally:
        release.set()
        holder.join()


def test_quiet_silences_only_its_own_thread() -> None:
    inside, release, silenced = threading.Event(), threading.Event(), threading.Event()

    def warn_quietly() -> None:
        with quiet():
            inside.set()
            warnings.warn("PatientName 'DOE^JANE' is odd", UserWarning, stacklevel=1)
            silenced.set()
            release.wait(10)

    thread = threading.Thread(target=warn_quietly)
    thread.start()
    try:
        assert inside.wait(10) and silenced.wait(10)
        with pytest.raises(UserWarning):  # this suite turns warnings into errors; outside quiet() they still are
            warnings.warn("elsewhere", UserWarning, stacklevel=1)
    finally:
        release.set()
        thread.join()
    with quiet():
        warnings.warn("in this thread too", UserWarning, stacklevel=1)
