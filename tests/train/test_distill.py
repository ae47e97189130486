import math

import pytest
import torch
import torch.nn.functional as F

from modeling_emovlm_kd import EmoVLMKDDistillationHead
from train.stages.distill import DistillationConfig, distillation_loss, train_distillation


def reference(student, teacher, labels, alpha, tau):
    kl = F.kl_div(F.log_softmax(student / tau, -1), F.softmax(teacher / tau, -1), reduction="batchmean")
    return alpha * tau**2 * kl + (1 - alpha) * F.cross_entropy(student, labels)


@pytest.mark.parametrize("alpha,tau", [(0.5, 2.0), (0.0, 2.0), (1.0, 2.0), (0.3, 1.0), (0.7, 4.0)])
def test_loss_matches_independent_computation(alpha, tau):
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(16, 8) * 3, torch.randn(16, 8) * 3, torch.randint(0, 8, (16,))
    loss, kl, ce = distillation_loss(student, teacher, labels, alpha, tau)
    torch.testing.assert_close(loss, reference(student, teacher, labels, alpha, tau), atol=1e-6, rtol=0)
    torch.testing.assert_close(ce, F.cross_entropy(student, labels), atol=1e-6, rtol=0)
    if alpha == 0.0:
        torch.testing.assert_close(loss, ce)
    if alpha == 1.0:
        torch.testing.assert_close(loss, kl)


def test_identical_logits_have_zero_kl_and_ignored_rows_are_masked():
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, -100, 3, -100, 2])
    _, kl, ce = distillation_loss(logits, logits, labels)
    assert kl.item() == pytest.approx(0.0, abs=1e-7)
    keep = labels != -100
    torch.testing.assert_close(ce, F.cross_entropy(logits[keep], labels[keep]))


def test_accumulated_micro_batches_equal_one_large_batch():
    torch.manual_seed(1)
    student, teacher, labels = torch.randn(10, 5), torch.randn(10, 5), torch.randint(0, 5, (10,))
    full, _, _ = distillation_loss(student, teacher, labels)
    parts = [distillation_loss(student[s], teacher[s], labels[s], num_items_in_batch=10)[0]
             for s in (slice(0, 7), slice(7, 10))]  # unequal micro-batches
    torch.testing.assert_close(sum(parts), full, atol=1e-6, rtol=0)


def test_config_checks_its_fields(tmp_path):
    with pytest.raises(ValueError, match="alpha"):
        DistillationConfig(output_dir=str(tmp_path), alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationConfig(output_dir=str(tmp_path), temperature=0)


def cached_split(n, dim=64, classes=4, seed=0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 2
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    features = centres[labels] + torch.randn(n, dim, generator=generator)
    teacher = F.one_hot(labels, classes).float() * 4 + torch.randn(n, classes, generator=generator)
    return {"visual_features": features, "teacher_logits": teacher, "labels": labels}


def test_trainer_trains_only_the_head_logs_loss_parts_and_keeps_the_best(tmp_path):
    torch.manual_seed(0)
    head = EmoVLMKDDistillationHead(64, [32], 4, "gelu", 0.1)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    args = DistillationConfig(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=16,
                              logging_steps=2, disable_tqdm=True)
    trained, trainer = train_distillation(head, cached_split(64), cached_split(32, seed=1), args)
    assert any(not torch.equal(before[k], v) for k, v in trained.state_dict().items())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("loss_kl" in e and "loss_ce" in e and math.isfinite(e["loss"]) for e in logged)
    assert trainer.state.best_metric is not None and trainer.state.best_metric > 0.5
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert checkpoints and (checkpoints[-1] / "model.safetensors").exists()


def test_teacher_with_other_class_count_is_rejected(tmp_path):
    head = EmoVLMKDDistillationHead(64, [32], 4, "gelu", 0.0)
    bad = cached_split(8, classes=4)
    bad["teacher_logits"] = torch.randn(8, 6)
    with pytest.raises(ValueError, match="6 classes"):
        train_distillation(head, bad, bad, DistillationConfig(output_dir=str(tmp_path)))
