"""Whisper through SpeechBrain's Hugging Face wrapper: a generalist as a ``CKPT+`` folder,
and encoder outputs kept on disk for experts whose encoder is frozen.

Fine-tuning only Whisper's decoder (``freeze_encoder: True``) leaves every expert, and
every merge of them, with the generalist's encoder bit for bit. Its outputs for an
utterance then never change, so :class:`EncoderStates` computes them once per
(encoder weights, audio file) and both training and evaluation reuse them: the
encoder over 30 s of padded audio is most of Whisper's cost on a CPU. The key is a
digest of the encoder's tensors and the mel filters, so a model whose encoder differs
in one bit gets its own states, computed by its own encoder.

>>> EncoderStates.file_key("/data/a.flac", size=10, mtime_ns=5) == EncoderStates.file_key("/data/a.flac", 10, 5)
True
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from merge_core.atomic import discard, publish, temp_path

CHECKPOINT_NAME = "whisper"  # the recoverable: CKPT+<name>/whisper.ckpt


def encoder_digest(whisper: torch.nn.Module) -> str:
    """SHA-256 of what shapes the encoder's output: its tensors and the mel filters."""
    digest = hashlib.sha256()
    tensors = dict(whisper.model.encoder.state_dict())
    tensors["_mel_filters"] = whisper._mel_filters
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class EncoderStates:
    """Whisper encoder outputs on disk, ``<folder>/<encoder digest>/<file key>.pt``.

    Parameters
    ----------
    folder : str or Path
        Where the states are kept (about 2.3 MB per utterance for tiny, fp32).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def file_key(path: str | Path, size: int, mtime_ns: int) -> str:
        """An audio file by path, size and modification time (rewritten audio gets new states)."""
        return hashlib.sha256(f"{Path(path).resolve()}\0{size}\0{mtime_ns}".encode()).hexdigest()[:32]

    def path(self, digest: str, audio: str | Path) -> Path:
        stat = os.stat(audio)
        return self.folder / digest / f"{self.file_key(audio, stat.st_size, stat.st_mtime_ns)}.pt"

    def states(
        self, whisper: torch.nn.Module, audio: Sequence[str | Path], encode: Callable[[list[int]], torch.Tensor]
    ) -> torch.Tensor:
        """The encoder outputs of ``audio`` stacked ``[batch, frames, dim]``: stored ones
        loaded, the others computed by ``encode(indices)`` (those utterances through
        ``whisper``'s own encoder) and stored atomically."""
        digest = encoder_digest(whisper)
        paths = [self.path(digest, a) for a in audio]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        computed = dict(zip(missing, encode(missing))) if missing else {}
        for i, state in computed.items():
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(paths[i], ".pt")
            torch.save(state.detach().cpu().clone(), tmp)
            publish(tmp, paths[i])
        return torch.stack([computed[i] if i in computed else torch.load(p, weights_only=True) for i, p in enumerate(paths)])


def encode_audio(whisper: torch.nn.Module, waveforms: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder over padded waveforms, as ``WhisperASR.encode_batch`` runs it
    (each utterance padded to 30 s, so one's output does not depend on its batch)."""
    with torch.no_grad():
        return whisper.forward_encoder(whisper._get_mel(waveforms))


def write_generalist(whisper_hub: str | Path, dest: Path, save_path: Path | None = None) -> Path:
    """The Whisper of ``whisper_hub`` (a local ``save_pretrained`` folder) as a Checkpointer
    folder ``dest`` (``CKPT+<name>/whisper.ckpt``, saved by SpeechBrain's own
    Checkpointer), so experts fine-tuned from it and their merges share its keys.
    Written beside ``dest`` and renamed into place: a folder that exists is whole."""
    from speechbrain.integrations.huggingface.whisper import Whisper
    from speechbrain.utils.checkpoints import Checkpointer

    if not dest.name.startswith("CKPT+"):
        raise ValueError(f"{dest}: a Checkpointer folder's name starts with 'CKPT+'")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".generalist-", dir=dest.parent))
    try:
        whisper = Whisper(str(whisper_hub), str(save_path or work / "hf"), freeze=True)
        saved = Checkpointer(work / "save", recoverables={CHECKPOINT_NAME: whisper}).save_checkpoint(
            name=dest.name.removeprefix("CKPT+"), verbosity=0
        )
        publish(Path(saved.path), dest)
    finally:
        discard(work)
    return dest
