"""The curvature recorder, the Trainer callback and the curvature artifact (issue 14, items 2-3).

Oracles: R and C of hand-chosen gradients worked out by hand for the three variants (and
against a float64 transcription of the definitions for a >2-D weight); the saliency of a
hand-worked 2×3 example; the recorder's state within 2(m + n) floats per matrix; Adam's
``exp_avg_sq`` equal to the optimizer's; a real ``transformers.Trainer`` equal to a plain loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mergeforge.checkpoint.sidecar import read_metadata, sidecar_path
from mergeforge.errors import ValidationError
from mergeforge.train import (
    Curvature,
    CurvatureMeta,
    CurvatureRecorder,
    load_curvature,
    saliency,
    save_curvature,
)

G1 = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])  # rowsum G² [5, 10], colsum [1, 5, 9]
G2 = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])  # rowsum G² [5, 3],  colsum [5, 1, 2]
B1, B2 = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])

# two steps, β₂ = 0.5: EMA = 0.25·x₁ + 0.5·x₂; notebook: of the means (rows /3, columns /2)
HAND = {
    "ema": ([3.75, 4.0], [2.75, 1.75, 3.25], [4.75, 1.0]),
    "notebook": ([1.25, 4 / 3], [1.375, 0.875, 1.625], [4.75, 1.0]),
    "sum": ([5.0, 6.5], [3.0, 3.0, 5.5], [5.0, 2.0]),
}


class Tiny(nn.Module):
    """A linear layer (2×3 weight, bias) and a conv weight (4, 2, 3), read as 4×6."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)
        self.conv = nn.Conv1d(2, 4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 2, 3)
        return self.lin(x.mean(1)).sum() + self.conv(x).square().sum()


def _save(model: nn.Module, folder):
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _record(variant: str, grads: list[dict[str, torch.Tensor | None]], **kw) -> CurvatureRecorder:
    model = Tiny()
    beta2 = None if variant == "sum" else 0.5
    rec = CurvatureRecorder(model, variant=variant, beta2=beta2, **kw)
    params = dict(model.named_parameters())
    for step in grads:
        for name, g in step.items():
            params[name].grad = g
        rec.step()
    return rec


@pytest.mark.parametrize("variant", ["ema", "notebook", "sum"])
def test_row_and_column_moments_by_hand(variant):
    rec = _record(variant, [{"lin.weight": G1, "lin.bias": B1}, {"lin.weight": G2, "lin.bias": B2}],
                  params=["lin.weight", "lin.bias"])  # fmt: skip
    c = rec.curvature()
    R, C, r = HAND[variant]
    torch.testing.assert_close(c["lin.weight"].R, torch.tensor(R))
    torch.testing.assert_close(c["lin.weight"].C, torch.tensor(C))
    torch.testing.assert_close(c["lin.bias"].R, torch.tensor(r))  # elementwise, no C
    assert c["lin.bias"].C is None and rec.steps == 2


@pytest.mark.parametrize("variant", ["ema", "notebook", "sum"])
def test_higher_dimensional_weight_and_missing_gradient_against_the_definition(variant):
    g = torch.Generator().manual_seed(1)
    steps = [torch.randint(-3, 4, (4, 2, 3), generator=g).float() for _ in range(3)]
    rec = _record(variant, [{"conv.weight": steps[0]}, {"conv.weight": None},
                            {"conv.weight": steps[2]}], params=["conv.weight"])  # fmt: skip
    steps[1] = torch.zeros(4, 2, 3)  # a step without a gradient is a zero gradient
    R, C = torch.zeros(4, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for G in steps:
        G2m = G.double().reshape(4, 6).square()
        r, c = (G2m.mean(1), G2m.mean(0)) if variant == "notebook" else (G2m.sum(1), G2m.sum(0))
        if variant == "sum":
            R, C = R + r / 3, C + c / 3
        else:
            R, C = 0.5 * R + 0.5 * r, 0.5 * C + 0.5 * c
    got = rec.curvature()["conv.weight"]
    torch.testing.assert_close(got.R.double(), R)
    torch.testing.assert_close(got.C.double(), C)


def test_one_record_per_optimizer_step_with_the_accumulated_gradient():
    """Two micro-batches per step: the step's G is their sum, recorded once (not each half)."""
    model = nn.Linear(3, 2, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x1, x2 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, -1.0, 2.0]])
    with CurvatureRecorder(model, optimizer=opt, variant="sum") as rec:
        for x in (x1, x2):
            model(x).sum().backward()
        G = model.weight.grad.clone()
        opt.step()
    torch.testing.assert_close(rec.curvature()["weight"].R, G.square().sum(1))
    assert rec.steps == 1 and rec.source == "recorder:SGD"
    opt.step()  # closed: no longer recorded
    assert rec.steps == 1


def test_saliency_hand_worked_2x3():
    tau = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, -1.0]])
    R, C = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 4.0, 9.0])
    # √(R ⊗ C) = [[2, 4, 6], [1, 2, 3]];  τ² = [[1, 4, 0], [9, 1, 1]]
    want = torch.tensor([[2.0, 16.0, 0.0], [9.0, 2.0, 3.0]])
    torch.testing.assert_close(saliency(tau, R, C), want)
    torch.testing.assert_close(saliency(torch.tensor([2.0, -1.0]), torch.tensor([9.0, 4.0])),
                               torch.tensor([12.0, 2.0]))  # fmt: skip
    t3 = torch.randn(4, 2, 3)  # >2-D: read as (4, 6), shape kept
    r, c = torch.rand(4), torch.rand(6)
    torch.testing.assert_close(
        saliency(t3, r, c), (t3.reshape(4, 6).square() * torch.outer(r, c).sqrt()).reshape(t3.shape)
    )
    with pytest.raises(ValueError, match=r"do not fit τ of shape \[2, 3\]"):
        saliency(tau, C, R)


def _held_floats(obj: object) -> int:
    """Numbers in every tensor an object holds (through dicts, lists, tuples), the model's
    parameters excepted."""
    total, stack = 0, list(vars(obj).values())
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter):
            total += x.numel()
        elif isinstance(x, dict):
            stack += x.values()
        elif isinstance(x, list | tuple):
            stack += x
    return total


def test_state_is_at_most_2_m_plus_n_floats_per_matrix():
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)  # fmt: skip
    model = tf.LlamaForCausalLM(cfg)
    rec = CurvatureRecorder(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    rec.step()
    budget = 0
    for name, p in model.named_parameters():
        m, n = p.shape[0], p[0].numel()
        assert rec.state_floats()[name] == (m + n if p.dim() >= 2 else p.numel()), name
        budget += 2 * (m + n) if p.dim() >= 2 else p.numel()
    assert _held_floats(rec) == sum(rec.state_floats().values()) <= budget


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_names_the_parameter_and_records_nothing(bad):
    rec = _record("ema", [{"lin.weight": G1}])
    before = rec.curvature()["lin.weight"].R.clone()
    g = G2.clone()
    g[1, 2] = bad
    dict(rec._params)["lin.weight"].grad = g
    with pytest.raises(ValidationError, match=r"lin\.weight has a NaN or infinite gradient"):
        rec.step()
    assert rec.steps == 1 and torch.equal(rec.curvature()["lin.weight"].R, before)


def test_round_trip_with_adamw_exp_avg_sq(tmp_path):
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    with CurvatureRecorder(model, optimizer=opt, keep_exp_avg_sq=True, beta2=0.9) as rec:
        for _ in range(3):
            model(x).backward()
            opt.step()
            opt.zero_grad()
    folder = _save(model, tmp_path / "expert")
    path = rec.save(folder, examples=15)
    assert path == sidecar_path(folder, "curvature")
    stats, meta = load_curvature(folder)
    assert meta == CurvatureMeta(variant="ema", steps=3, source="recorder:AdamW", beta2=0.9,
                                 examples=15)  # fmt: skip
    want = rec.curvature()
    assert set(stats) == {"lin.weight", "lin.bias", "conv.weight"}
    for name, p in model.named_parameters():
        torch.testing.assert_close(stats[name].R, want[name].R, rtol=0, atol=0)
        assert (stats[name].C is None) == (p.dim() == 1) and stats[name].S is None
        torch.testing.assert_close(stats[name].v, opt.state[p]["exp_avg_sq"], rtol=0, atol=0)
    md = read_metadata(path)
    assert md["kind"] == "curvature" and md["has_exp_avg_sq"] == "true"
    assert md["has_saliency"] == "false" and md["beta2"] == "0.9" and md["examples"] == "15"


def test_exp_avg_sq_from_an_optimizer_without_it_fails_at_its_first_step():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = CurvatureRecorder(model, optimizer=opt, keep_exp_avg_sq=True)
    model(torch.ones(1, 3)).sum().backward()
    with pytest.raises(ValidationError, match=r"SGD keeps no 'exp_avg_sq' for weight"):
        opt.step()
    rec.close()


def test_stale_and_missing_artifacts_are_refused_with_the_command(tmp_path):
    folder = tmp_path / "expert"
    with pytest.raises(ValidationError, match=r"missing statistics.*CurvatureRecorder"):
        load_curvature(_save(Tiny(), folder))
    rec = _record("ema", [{"lin.weight": G1, "lin.bias": B1, "conv.weight": torch.ones(4, 2, 3)}])
    rec.save(folder)
    load_curvature(folder)
    model = Tiny()
    with torch.no_grad():
        model.lin.weight.add_(1.0)  # retrained: same names and shapes, new weights
    _save(model, folder)
    with pytest.raises(ValidationError, match=r"stale.*CurvatureCallback\(\)"):
        load_curvature(folder)


def test_wrong_shape_or_unknown_key_is_refused_and_nothing_written(tmp_path):
    folder = _save(Tiny(), tmp_path / "expert")
    meta = CurvatureMeta(variant="sum", steps=1, source="test")
    ok = {"lin.bias": Curvature(R=torch.ones(2))}
    cases = [
        ({"lin.weight": Curvature(R=torch.ones(3), C=torch.ones(3))},
         r"lin\.weight:R has shape \[3\], but lin\.weight is \[2, 3\].*must be \[2\]"),
        ({"conv.weight": Curvature(R=torch.ones(4), C=torch.ones(3))},
         r"conv\.weight:C has shape \[3\].*must be \[6\]"),
        ({"lin.bias": Curvature(R=torch.ones(2), C=torch.ones(2))}, r"lin\.bias:C.*1-D.*no C"),
        ({"head.weight": Curvature(R=torch.ones(2), C=torch.ones(3))},
         r"'head\.weight'.*has no such tensor"),
        ({"lin.weight": Curvature(R=torch.ones(2))}, r"lin\.weight.*lack the column moment C"),
        ({"lin.bias": Curvature(R=torch.tensor([1.0, float("nan")]))}, r"lin\.bias:R.*NaN"),
    ]  # fmt: skip
    for stats, match in cases:
        with pytest.raises(ValidationError, match=match):
            save_curvature(folder, {**ok, **stats}, meta)
    assert not sidecar_path(folder, "curvature").exists()
    with pytest.raises(ValueError, match="beta2"):
        save_curvature(folder, ok, CurvatureMeta(variant="ema", steps=1, source="test"))


def test_bad_recorder_arguments():
    model = nn.Linear(2, 2)
    for kw, match in [
        ({"variant": "adam"}, "variant must be one of"),
        ({"variant": "sum", "beta2": 0.9}, "no meaning for variant 'sum'"),
        ({"beta2": 1.0}, r"beta2 must be in \[0, 1\)"),
        ({"keep_exp_avg_sq": True}, "pass optimizer="),
        ({"params": ["bias", "weigth"]}, "'weigth' is not a parameter"),
    ]:
        with pytest.raises(ValueError, match=match):
            CurvatureRecorder(model, **kw)
    with pytest.raises(ValidationError, match=r"no training step was recorded"):
        CurvatureRecorder(model).save("unused")


def test_tied_embedding_is_stored_once_under_its_saved_name(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16)
    model = tf.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rec = CurvatureRecorder(model, optimizer=opt)
    ids = torch.arange(8)[None] % 32
    model(input_ids=ids, labels=ids).loss.backward()
    G = model.transformer.wte.weight.grad.clone()  # both uses (input embedding and lm_head)
    opt.step()
    model.save_pretrained(tmp_path / "gpt2")
    rec.save(tmp_path / "gpt2")
    stats, _ = load_curvature(tmp_path / "gpt2")
    assert "lm_head.weight" not in stats
    torch.testing.assert_close(stats["transformer.wte.weight"].R, 0.001 * G.square().sum(1))


def _bert():
    import transformers as tf

    cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, vocab_size=64, max_position_embeddings=16,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=2)  # fmt: skip
    torch.manual_seed(0)
    return tf.BertForSequenceClassification(cfg)


def test_trainer_callback_writes_what_a_plain_loop_records(tmp_path):
    """A real Trainer, 3 steps of one 4-example batch (so data order does not matter), no
    dropout: the artifact beside checkpoint-3 equals a plain loop's recorder, and
    ``callback.save`` after ``trainer.save_model`` writes the final one."""
    import transformers as tf

    from mergeforge.train import CurvatureCallback

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 64, (8,), generator=g),
             "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.tensor(i % 2)} for i in range(4)]  # fmt: skip
    model = _bert()
    plain = copy.deepcopy(model)

    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-3, lr_scheduler_type="constant", weight_decay=0.0, optim="adamw_torch",
        max_grad_norm=1.0, save_strategy="steps", save_steps=3, save_only_model=True,
        report_to="none", use_cpu=True, logging_strategy="no", seed=0, disable_tqdm=True,
    )  # fmt: skip
    callback = CurvatureCallback()
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    ckpt = tmp_path / "run" / "checkpoint-3"
    assert (ckpt / "mergeforge-stats" / "curvature.safetensors").is_file()
    got, meta = load_curvature(ckpt)
    assert (meta.steps, meta.examples, meta.source) == (3, 12, "recorder:AdamW")
    trainer.save_model(str(tmp_path / "final"))
    callback.save(tmp_path / "final")
    final, _ = load_curvature(tmp_path / "final")

    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.0)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    plain.train()
    with CurvatureRecorder(plain, optimizer=opt) as rec:
        for _ in range(3):
            plain(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
    want = rec.curvature()
    assert set(got) == set(want) == set(final)
    # equal up to the order of the batch's rows (the Trainer shuffles); attention key biases have
    # a zero gradient in exact arithmetic (softmax ignores a shift): their R is noise ~1e-29
    for name, c in want.items():
        assert c.R.max() > 0, name
        torch.testing.assert_close(got[name].R, c.R, rtol=1e-4, atol=1e-20, msg=name)
        torch.testing.assert_close(final[name].R, got[name].R, rtol=0, atol=0)
        if c.C is not None:
            torch.testing.assert_close(got[name].C, c.C, rtol=1e-4, atol=1e-20, msg=name)
