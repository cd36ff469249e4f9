"""`--task audio_ctc`: speech recognition by CTC over letters, wav2vec 2.0's fine-tuning recipe as
data2vec used it (fairseq `examples/wav2vec/config/finetuning/*.yaml`, models/wav2vec/wav2vec2_asr.py,
criterions/ctc.py): the encoder + dropout + linear head (models/ctc.py), time and channel masking,
the CNN frozen, the whole encoder frozen for `freeze_finetune_updates`, the encoder's dropouts and
layerdrop replaced by the fine-tuning values (wav2vec2_asr.py's arg_overrides for data2vec_multi),
CTC loss summed over frames and averaged over utterances (sentence_avg), zero_infinity; greedy
WER/CER on the validation shards (and beam WER with `--lm.at_validation`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data import DataError, check_shards, find_shards, sample_counts
from ..data.audio import TranscribedAudio
from ..data.letters import BLANK, DICT_FILE, LetterDict
from ..data.transcripts import check_letters, check_transcripts, letters_for
from ..dist import Dist, all_reduce_sum
from ..evaluate import EvalShards, EvalStream
from ..evaluate.ctc_decode import BeamDecoder, ErrorCounts, greedy_decode
from ..evaluate.features import eval_loader
from ..masking import seed_for
from ..models.ctc import CTCModel
from ..pretrained import EncoderWeights, finetune_encoder
from .task import Task


def ctc_loss(logits: torch.Tensor, frame_pad: torch.Tensor | None, target: torch.Tensor,
             target_lengths: torch.Tensor) -> torch.Tensor:
    """Summed over the batch (fairseq criterions/ctc.py: reduction sum, zero_infinity, blank 0)."""
    lprobs = logits.float().log_softmax(-1).transpose(0, 1)                     # (T, B, V)
    lengths = CTCModel.frame_lengths(logits, frame_pad).to(logits.device)       # (B,)
    return F.ctc_loss(lprobs, target.to(logits.device), lengths, target_lengths.to(logits.device), blank=BLANK,
                      reduction="sum", zero_infinity=True)


class AudioCTC(Task):
    name = "audio_ctc"
    modality = "audio"
    metric = "val/wer"
    higher_is_better = False
    export_kind = "classifier"      # encoder + head tensors, read back by load_encoder and `d2v transcribe`

    letters: LetterDict | None = None
    letters_from = ""

    def prepare(self, weights: EncoderWeights, world: int) -> EvalShards:
        cfg, f = self.cfg, self.cfg.finetune
        train = find_shards(cfg.data.path, cfg.data.allow_pipe)
        check_transcripts(train, f"--train {cfg.data.path}")
        self.letters, self.letters_from = letters_for(train)
        if weights.head and weights.head["head.weight"].shape[0] != len(self.letters):
            raise ConfigError(f"--init {f.init} has a {weights.head['head.weight'].shape[0]}-symbol CTC head and the "
                              f"letter dictionary of --train ({self.letters_from}) has {len(self.letters)}: fine-tune "
                              "the pretrained encoder instead, or shards with the same dictionary")
        val = find_shards(f.val, cfg.data.allow_pipe)
        check_shards(val, "audio", f"--val {f.val}", every_local=False)
        check_transcripts(val, f"--val {f.val}")
        check_letters(val, self.letters, f"--val {f.val}")
        counts = sample_counts(val)
        if sum(counts) < 1:
            raise DataError(f"--val {f.val} holds no samples; CTC validation needs at least one utterance")
        # wav2vec2_asr.py (data2vec_multi): dropout -> encoder/prenet/post-MLP dropout, layerdrop -> both
        cfg.model = dataclasses.replace(
            cfg.model, encoder_dropout=f.encoder_dropout, post_mlp_drop=f.encoder_dropout,
            prenet_dropout=f.encoder_dropout, attention_dropout=f.attention_dropout,
            activation_dropout=f.activation_dropout, layerdrop=f.layerdrop, prenet_layerdrop=f.layerdrop)
        if f.mask_channel_prob > 0 and f.mask_channel_length >= cfg.model.embed_dim:
            raise ConfigError(f"--finetune.mask_channel_length={f.mask_channel_length} masks every one of the "
                              f"{cfg.model.embed_dim} channels: pick a length below the encoder's width")
        if cfg.lm.at_validation:
            BeamDecoder(self.letters, cfg.lm)                  # the decoder's files are checked here
        return EvalShards(val.urls, counts, 0, f"--val {f.val}")

    def describe(self) -> str:
        return f"{len(self.letters.symbols)} letters + blank ({self.letters_from})"

    def build_model(self, weights: EncoderWeights) -> CTCModel:
        """The pretrained encoder (with the fine-tuning dropouts of cfg.model) + a new head, or the
        weights' head when they are a CTC model of the same dictionary."""
        f = self.cfg.finetune
        encoder = finetune_encoder(dataclasses.replace(weights, cfg=self.cfg), 0.0, self.cfg.run.seed)
        model = CTCModel(encoder, self.cfg.model.embed_dim, len(self.letters), f.final_dropout, f.mask_prob,
                         f.mask_length, f.mask_channel_prob, f.mask_channel_length, f.freeze_feature_encoder)
        if weights.head:
            model.head.load_state_dict({"weight": weights.head["head.weight"], "bias": weights.head["head.bias"]})
        return model

    def train_codec(self) -> TranscribedAudio:
        return TranscribedAudio(self.cfg.data, self.letters)

    def val_codec(self) -> TranscribedAudio:
        return TranscribedAudio(self.cfg.data, self.letters)

    def loss(self, model, batch: dict, step: int, dist: Dist, dtype: torch.dtype) -> torch.Tensor:
        """Masked forward (masks from numpy's seeded RNG, layerdrop from a seed every rank shares), CTC
        loss per utterance (sentence_avg)."""
        x = batch["source"].to(dist.device, non_blocking=True).to(dtype)        # (B, S)
        pad = batch["padding_mask"].to(dist.device)                              # (B, S)
        frozen = step < self.cfg.finetune.freeze_finetune_updates
        logits, frame_pad = model(x, pad, mask_seed=int(np.random.randint(0, 2**31 - 1)),
                                  layer_seed=seed_for(self.cfg.run.seed, step, 0x1A7E4), frozen=frozen)   # (B, T, V)
        return ctc_loss(logits, frame_pad, batch["target"], batch["target_lengths"]) / x.shape[0]

    @torch.no_grad()
    def validate(self, model, stream: EvalStream, dist: Dist, dtype: torch.dtype, num_workers: int) -> dict[str, float]:
        """Greedy WER/CER (and, with --lm.at_validation, beam WER) and the CTC loss per utterance."""
        beam = BeamDecoder(self.letters, self.cfg.lm) if self.cfg.lm.at_validation else None
        greedy, beamed, loss, n = ErrorCounts(), ErrorCounts(), 0.0, 0
        for batch in eval_loader(stream, num_workers):
            if "error" in batch:
                raise DataError(batch["error"])
            pad = batch.get("padding_mask")
            logits, frame_pad = model(batch["source"].to(dist.device).to(dtype),
                                      pad.to(dist.device) if pad is not None else None)   # (B, T, V)
            keep = (batch["index"] >= 0).tolist()                                # padding batches: -1
            if not any(keep):
                continue
            rows = torch.tensor(keep)
            logits = logits.float().cpu()[rows]
            frame_pad = frame_pad.cpu()[rows] if frame_pad is not None else None
            lengths = CTCModel.frame_lengths(logits, frame_pad)
            refs = [t for t, k in zip(batch["text"], keep) if k]
            loss += float(ctc_loss(logits, frame_pad, batch["target"][rows], batch["target_lengths"][rows]))
            n += len(refs)
            for hyp, ref in zip(greedy_decode(logits, lengths, self.letters), refs):
                greedy.add(hyp, ref)
            if beam is not None:
                for hyp, ref in zip(beam(logits, lengths), refs):
                    beamed.add(hyp, ref)
        sums = torch.tensor(greedy.as_list() + beamed.as_list() + [loss, n], dtype=torch.float64)
        sums = all_reduce_sum(sums.to(dist.device)).cpu().tolist()
        rates = ErrorCounts.rates(sums[:4])
        out = {"val/wer": rates["wer"], "val/cer": rates["cer"], "val/loss": sums[8] / max(sums[9], 1.0)}
        if beam is not None:
            out["val/wer_beam"] = ErrorCounts.rates(sums[4:8])["wer"]
        return out

    def save_files(self, run_dir: Path) -> None:
        self.letters.save(Path(run_dir) / DICT_FILE)

    def export_info(self, state: dict[str, torch.Tensor]) -> dict:
        return {"vocab_size": int(state["head.weight"].shape[0]), "letters": self.letters.text()}
