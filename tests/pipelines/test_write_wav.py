"""write_wav: 16-bit PCM WAV files from Dance Diffusion output."""

import wave

import numpy as np
import pytest

from diffusekit.pipelines.dance_diffusion import write_wav


def _read(path):
    with wave.open(str(path), "rb") as f:
        frames = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
        return f.getnchannels(), f.getsampwidth(), f.getframerate(), frames.reshape(-1, f.getnchannels()).T


def test_stereo_round_trip_with_clipping(tmp_path):
    audio = np.array([[0.0, 0.5, -0.5, 1.5], [-1.0, 0.25, 1.0, -2.0]], dtype=np.float32)
    path = write_wav(tmp_path / "a.wav", audio, 16_000)
    assert path == tmp_path / "a.wav"
    channels, width, rate, pcm = _read(path)
    assert (channels, width, rate) == (2, 2, 16_000)
    np.testing.assert_array_equal(pcm, [[0, 16384, -16384, 32767], [-32767, 8192, 32767, -32767]])


def test_mono_from_one_dimensional_audio(tmp_path):
    channels, _, rate, pcm = _read(write_wav(tmp_path / "m.wav", np.linspace(-1, 1, 5), 8000))
    assert channels == 1 and rate == 8000 and pcm.tolist() == [[-32767, -16384, 0, 16384, 32767]]


@pytest.mark.parametrize("audio, rate, message", [
    (np.zeros((1, 2, 3)), 8000, "shaped"),
    (np.array([0.0, np.nan]), 8000, "NaN"),
    (np.zeros(4), 0, "sample_rate"),
    (np.zeros(4), 44.1, "sample_rate"),
])
def test_bad_input_is_refused(tmp_path, audio, rate, message):
    with pytest.raises(ValueError, match=message):
        write_wav(tmp_path / "x.wav", audio, rate)
