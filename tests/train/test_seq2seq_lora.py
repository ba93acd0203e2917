"""LoRA on an encoder-decoder (finetune.lora=true with finetune.task=seq2seq), without Ray: the t5
preset gets peft SEQ_2_SEQ_LM adapters on its attention q and v projections, only they train, and
merging them gives the adapted model's own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmos_ray.config import load_config


def test_t5_lora_adapts_q_and_v_only_and_merges_to_the_same_model(tiny_tokenizer_dir):
    from transformers import AutoModelForSeq2SeqLM

    from llmos_ray.data.tokenizer import load_tokenizer
    from llmos_ray.models import preset_config
    from llmos_ray.train.lora import apply_lora
    from llmos_ray.train.tasks import Seq2SeqLM

    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = load_config(None, ["finetune.task=seq2seq", "finetune.lora=true", "finetune.lora_dropout=0"])
    torch.manual_seed(0)
    config = preset_config("t5", "tiny", len(tok), 64, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    model = apply_lora(AutoModelForSeq2SeqLM.from_config(config), cfg, task="seq2seq")
    assert model.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".lora_")[0].rsplit(".", 1)[1] for n in trainable} == {"q", "v"}
    for n, p in model.named_parameters():  # non-zero B, so the adapters change the outputs
        if ".lora_B." in n:
            torch.nn.init.normal_(p, std=0.02)
    task = Seq2SeqLM(decoder_start_id=config.decoder_start_token_id, pad_id=tok.pad_token_id)
    ids = torch.tensor([tok("Open the file")["input_ids"]])
    labels = torch.tensor([tok("Ouvrir le fichier")["input_ids"] + [tok.eos_token_id]])
    micro = np.zeros(1, dtype=[("input_ids", np.int32, (ids.shape[1],)), ("attention_mask", np.int8, (ids.shape[1],)),
                               ("labels", np.int32, (labels.shape[1],))])
    micro["input_ids"], micro["attention_mask"], micro["labels"] = ids.numpy(), 1, labels.numpy()
    batch = task.batch(micro, "cpu")
    loss, _ = task.loss(model, batch)
    loss.backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())
    model.eval()
    with torch.no_grad():
        adapted = task._logits(model, batch)
        merged = model.merge_and_unload().eval()
        assert torch.allclose(task._logits(merged, batch), adapted, atol=1e-5)
        base = AutoModelForSeq2SeqLM.from_config(config)  # another init: outputs differ
        assert not torch.allclose(task._logits(base.eval(), batch), adapted, atol=1e-3)
    assert pytest.approx(loss.item(), rel=1e-6) == task.loss(merged, batch)[0].item()
