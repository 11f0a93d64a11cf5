"""Clip mode equals diffusers' SanaVideoPipeline run on the same components (text encoding, CFG, scheduler, VAE)."""

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, SanaVideoPipeline, SanaVideoTransformer3DModel

from engine.pipeline import VideoPipeline
from engine.presets import COMPLEX_HUMAN_INSTRUCTION
from engine.types import GenerationParams


def diffusers_twin(ours: VideoPipeline) -> SanaVideoPipeline:
    transformer = SanaVideoTransformer3DModel(**ours.transformer.config.to_dict()).eval()
    transformer.load_state_dict(ours.transformer.state_dict())
    scheduler = DPMSolverMultistepScheduler.from_config(ours.scheduler_config)
    return SanaVideoPipeline(
        tokenizer=ours.text_encoder.tokenizer, text_encoder=ours.text_encoder.model, vae=ours.vae,
        transformer=transformer, scheduler=scheduler,
    )


def test_text_encoding_matches_diffusers():
    ours = VideoPipeline.from_pretrained("tiny")
    theirs = diffusers_twin(ours)
    for use_instruction in (False, True):
        ours.text_encoder.use_instruction = use_instruction
        chi = list(COMPLEX_HUMAN_INSTRUCTION) if use_instruction else []
        emb, mask, neg, neg_mask = theirs.encode_prompt(
            "A Red circle moving left", do_classifier_free_guidance=True, negative_prompt="blurry",
            device=torch.device("cpu"), max_sequence_length=ours.text_encoder.max_sequence_length,
            complex_human_instruction=chi,
        )
        got, got_mask = ours.text_encoder.encode(["A Red circle moving left"])
        got_neg, got_neg_mask = ours.text_encoder.encode(["blurry"], with_instruction=False)
        assert torch.equal(got_mask, mask) and torch.equal(got_neg_mask, neg_mask)
        assert torch.allclose(got, emb, atol=1e-6) and torch.allclose(got_neg, neg, atol=1e-6)


def test_clip_mode_matches_diffusers_pipeline():
    ours = VideoPipeline.from_pretrained("tiny")
    theirs = diffusers_twin(ours)
    params = ours.resolve(GenerationParams(prompt="a blue square moving up", negative_prompt="", frames=9, steps=3,
                                           guidance_scale=4.0, seed=11))
    got = np.concatenate([c.frames for c in ours.generate(params)]).astype(np.float32) / 255.0
    expected = theirs(
        prompt=params.prompt, negative_prompt="", height=64, width=64, frames=9, num_inference_steps=3,
        guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(11), output_type="np",
        use_resolution_binning=False, complex_human_instruction=[],
        max_sequence_length=ours.text_encoder.max_sequence_length,
    ).frames[0]
    assert expected.shape == got.shape == (9, 64, 64, 3)
    assert np.abs(got - expected).max() <= 1.0 / 255 + 1e-4
