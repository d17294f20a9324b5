"""Recovery: the loss, parameter groups, the data mix, chat masks, checkpoint/resume, probes and the CLI.

Everything runs on tiny models built in code, on CPU, in a few seconds.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as Fn
from conftest import VOCAB, random_blocks, tiny_config, tiny_model, tiny_tokenizer, write_corpus, write_tiny_checkpoint

from vac.config import make_config
from vac.errors import VacError
from vac.families import find_targets
from vac.mixing import StreamCursor, distillation_mix, render_conversation, replay_mix
from vac.pipeline import compress_
from vac.probes import Probe, check_output, check_think, default_probes, probes_from_config, run_probes
from vac.recover import (RecoverConfig, balance_factors, check_compatible, check_param_groups, distillation_loss,
                         load_recover_yaml, main, make_optimizer, make_recover_config, param_groups, recover_)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: extra threads only contend with whatever else runs on the machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def compressed_pair(family: str = "llama", ratio: float = 2.0):
    teacher = tiny_model(family)
    student = copy.deepcopy(teacher)
    compress_(student, make_config(dict(method="svd", ratio=ratio)), random_blocks(4, 32), progress=False)
    return student, teacher


def write_chat(path: Path, n: int = 40) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"w{i % 7} w{(i + 1) % 7}"},
                          {"role": "assistant", "content": f"w{10 + i % 20} w{30 + i % 20} w50"}]} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def data(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_corpus(corpus, docs=40, words=50)
    return {"corpus": str(corpus), "chat": str(write_chat(tmp_path / "chat.jsonl"))}


def config(data, **kw) -> RecoverConfig:
    base = dict(steps=6, lr=2e-3, seq_len=32, batch_size=2, warmup_steps=1, pretrain_data=data["corpus"],
                eval_data=data["corpus"], eval_samples=4, eval_every=0, checkpoint_every=0, run_probes=False,
                wandb_mode="disabled", device="cpu")
    return make_recover_config({**base, **kw})


# --- the loss ----------------------------------------------------------------------------------------------------


def test_distillation_loss_is_the_masked_per_token_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    ids = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding: positions predicting tokens 3 and 4 of row 1 do not count
    T, a = 2.0, 0.7
    total, parts = distillation_loss(s, t, ids, mask, temperature=T, alpha=a)
    expected, n = 0.0, 0
    for b in range(2):
        for i in range(4):
            if not mask[b, i + 1]:
                continue
            pt, ls = Fn.softmax(t[b, i] / T, -1), Fn.log_softmax(s[b, i] / T, -1)
            kl = (pt * (pt.log() - ls)).sum()
            nll = -Fn.log_softmax(s[b, i], -1)[ids[b, i + 1]]
            expected += a * T * T * kl + (1 - a) * nll
            n += 1
    assert parts["tokens"] == n == 6
    torch.testing.assert_close(total, torch.as_tensor(expected), rtol=1e-5, atol=1e-5)
    nll_only, _ = distillation_loss(s, None, ids, mask, temperature=T, alpha=0.0)
    torch.testing.assert_close(nll_only, Fn.cross_entropy(s[:, :-1][mask[:, 1:]], ids[:, 1:][mask[:, 1:]],
                                                          reduction="sum"))


def test_loss_decreases_on_a_fixed_batch(data):
    student, teacher = compressed_pair()
    rcfg = config(data)
    groups = param_groups(student, rcfg, lr=1e-3)
    opt = make_optimizer(groups, rcfg, torch.device("cpu"))
    ids = random_blocks(4, 32, seed=3)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    losses = []
    for _ in range(12):
        loss, parts = distillation_loss(student(input_ids=ids).logits, t_logits, ids, mask, temperature=2.0,
                                        alpha=0.7)
        (loss / parts["tokens"]).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / parts["tokens"])
    assert losses[-1] < losses[0] - 0.05, losses


def test_balanced_factors_keep_the_product_and_share_the_scale():
    g = torch.Generator().manual_seed(0)
    up = torch.randn(12, 4, generator=g) * 100  # the unweighting of a weighted SVD leaves scales this far apart
    down = torch.randn(4, 9, generator=g) * 1e-3
    new_up, new_down = balance_factors(up, down)
    torch.testing.assert_close(new_up @ new_down, up @ down, rtol=1e-5, atol=1e-7)
    gram_up, gram_down = new_up.T @ new_up, new_down @ new_down.T
    torch.testing.assert_close(gram_up, gram_down, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gram_up, torch.diag(torch.diagonal(gram_up)), rtol=0, atol=1e-4 * gram_up.abs().max())


# --- parameter groups ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,tied", [("llama", False), ("olmo3", False), ("llama", True)])
def test_every_trainable_parameter_is_in_exactly_one_group(family, tied):
    from transformers import AutoModelForCausalLM

    if tied:
        cfg = tiny_config(family)
        cfg.tie_word_embeddings = True
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(cfg).eval()
        student = copy.deepcopy(teacher)
        compress_(student, make_config(dict(method="svd", ratio=2.0)), random_blocks(4, 32), progress=False)
    else:
        student, _ = compressed_pair(family)
    for train_embeddings in (False, True):
        rcfg = RecoverConfig(lr=3e-4, attn_lr_mult=7.0, train_embeddings=train_embeddings)
        groups = param_groups(student, rcfg)
        check_param_groups(student, groups)  # raises unless each trainable parameter is in exactly one group
        by_name = {g["name"]: g for g in groups}
        assert by_name["attention"]["lr"] == pytest.approx(7.0 * 3e-4)
        assert by_name["mlp"]["lr"] == pytest.approx(3e-4)
        assert by_name["norms"]["weight_decay"] == 0.0
        assert ("embeddings" in by_name) == train_embeddings
        for t in find_targets(student):  # the factors follow their target's component
            for pn, _ in student.get_submodule(t.name).named_parameters():
                assert f"{t.name}.{pn}" in by_name[t.component]["names"]
        emb = student.get_input_embeddings().weight
        assert emb.requires_grad == train_embeddings
        assert student.get_output_embeddings().weight.requires_grad == train_embeddings
        if train_embeddings and tied:
            assert len(by_name["embeddings"]["params"]) == 1
        n_grouped = sum(len(g["params"]) for g in groups)
        assert n_grouped == sum(1 for p in student.parameters() if p.requires_grad)

    rcfg = RecoverConfig()
    groups = param_groups(student, rcfg)
    groups[1]["params"].append(groups[0]["params"][0])
    with pytest.raises(AssertionError, match="two optimizer groups"):
        check_param_groups(student, groups)
    groups = param_groups(student, rcfg)
    groups[0]["params"].pop()
    with pytest.raises(AssertionError, match="in no group"):
        check_param_groups(student, groups)


# --- data ---------------------------------------------------------------------------------------------------------


def test_chat_rendering_masks_non_assistant_tokens():
    tok = tiny_tokenizer()
    messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w3 w4 w5"},
                {"role": "assistant", "content": "w10 w11"}, {"role": "user", "content": "w6"},
                {"role": "assistant", "content": "w12 w13 w14"}]
    ids, mask = render_conversation(messages, tok)
    assert len(ids) == len(mask)
    kept = tok.decode([i for i, m in zip(ids, mask) if m])
    assert kept.split() == ["w10", "w11", "<eos>", "w12", "w13", "w14", "<eos>"]  # the turns and their ends
    dropped = tok.convert_ids_to_tokens([i for i, m in zip(ids, mask) if not m])
    assert {"w1", "w2", "w3", "w4", "w5", "w6"} <= set(dropped)
    assert not {"w10", "w11", "w12", "w13", "w14"} & set(dropped)


def test_replay_rows_carry_loss_on_assistant_tokens_only(data):
    tok = tiny_tokenizer()
    mix = replay_mix(tok, chat=data["chat"], seq_len=24, seed=0, eval_source=None)
    ids, mask = mix.next_batch(6)
    user_words = {tok.convert_tokens_to_ids(f"w{i}") for i in range(7)}
    assert mask.any() and not mask.all()
    assert not (set(ids[mask].tolist()) & user_words)
    with pytest.raises(VacError, match="conversation records"):
        replay_mix(tok, chat=data["corpus"], seq_len=24, seed=0, eval_source=None).next_batch(1)


def test_mix_is_deterministic_resumable_and_never_trains_on_eval_documents(tmp_path, data):
    tok = tiny_tokenizer()
    corpus = tmp_path / "words.txt"  # document i is the word w{i} repeated: the rows show where they came from
    corpus.write_text("\n\n".join(" ".join([f"w{60 + i}"] * 9) for i in range(12)))

    def make():
        return distillation_mix(tok, pretrain=str(corpus), chat=data["chat"], chat_fraction=0.25, seq_len=16,
                                seed=5, eval_source=str(corpus))

    a, b = make(), make()
    first = [a.next_batch(4) for _ in range(3)]
    state = json.loads(json.dumps(a.state()))  # the position survives JSON (state.json)
    rest = [a.next_batch(4) for _ in range(12)]  # > 1 epoch of the 9 training documents
    for x, y in zip(first, [b.next_batch(4) for _ in range(3)]):
        assert torch.equal(x[0], y[0])
    c = make()
    c.load(state)
    for x, y in zip(rest, [c.next_batch(4) for _ in range(12)]):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert a.state()["parts"]["pretrain"]["cursor"]["epoch"] >= 1
    seen = torch.cat([x[0] for x in first + rest]).unique().tolist()
    eval_words = {tok.convert_tokens_to_ids(f"w{60 + i}") for i in (3, 7, 11)}
    assert not eval_words & set(seen)
    assert {tok.convert_tokens_to_ids(f"w{60 + i}") for i in (0, 1, 2, 4, 5, 6, 8, 9, 10)} <= set(seen)
    share = sum(a.part_of(r).name == "chat" for r in range(2000)) / 2000
    assert abs(share - 0.25) < 0.04


def test_stream_cursor_resumes_at_the_exact_record(tmp_path):
    import datasets

    path = tmp_path / "stream.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"w{i} w{i}"}) for i in range(10)) + "\n")

    def opener(source):
        return datasets.load_dataset("json", data_files=source, split="train", streaming=True)

    tok = tiny_tokenizer()
    cur = StreamCursor(str(path), tok, holdout=True, seed=0, opener=opener)
    walk = []
    for _ in range(4):
        walk.append(cur.current()["text"])
        cur.advance()
    state = json.loads(json.dumps(cur.state()))
    after = []
    for _ in range(9):  # crosses the end of the stream into epoch 1
        after.append(cur.current()["text"])
        cur.advance()
    assert walk == ["w0 w0", "w1 w1", "w2 w2", "w4 w4"]  # w3 and w7 are evaluation documents
    again = StreamCursor(str(path), tok, holdout=True, seed=0, opener=opener)
    again.load(state)
    assert [again.current()["text"] for _ in range(1)] + [(again.advance(), again.current()["text"])[1]
                                                           for _ in range(8)] == after
    assert cur.epoch == 1


def test_bad_data_sources_fail_clearly(tmp_path, data):
    tok = tiny_tokenizer()
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(VacError, match="no usable text"):
        distillation_mix(tok, pretrain=str(empty), chat=None, chat_fraction=0.2, seq_len=8, seed=0, eval_source=None)
    with pytest.raises(VacError, match="no such file"):
        distillation_mix(tok, pretrain=str(tmp_path / "missing.txt"), chat=None, chat_fraction=0.2, seq_len=8,
                         seed=0, eval_source=None)
    with pytest.raises(VacError, match="needs --chat-data"):
        config(data, sft_steps=2)


# --- the loop, checkpoints, resume ----------------------------------------------------------------------------


def test_student_and_teacher_vocabularies_must_match(data):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    student, _ = compressed_pair()
    cfg = tiny_config("llama")
    cfg.vocab_size = VOCAB + 2
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(VacError, match="vocabularies differ"):
        recover_(student, other, tiny_tokenizer(), config(data), progress=False)
    from tokenizers import Tokenizer, models

    words = {f"x{i}": i for i in range(VOCAB)}
    tok2 = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="x0")))
    with pytest.raises(VacError, match="tokenizers differ"):
        check_compatible(student, tiny_model(), tiny_tokenizer(), tok2)


def test_recovery_reduces_kl_to_the_teacher(data):
    teacher = tiny_model()
    with torch.no_grad():  # a random tiny model is nearly uniform: sharpen it so that KL has room to move
        teacher.lm_head.weight.mul_(10)
    student = copy.deepcopy(teacher)
    # a pinned student (knapsack ranks from spectra at damp 0.1) whose KL starts high enough to measure a fall
    compress_(student, make_config(dict(method="svd", ratio=3.0, damp=0.1)), random_blocks(4, 32), progress=False)
    res = recover_(student, teacher, tiny_tokenizer(), config(data, steps=15, batch_size=4, alpha=1.0, lr=1e-3,
                                                              attn_lr_mult=1.0, eval_samples=6), progress=False)
    assert res["after"]["student"]["kl"] < 0.92 * res["before"]["student"]["kl"]
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)  # frozen
    assert not student.training


def test_resume_after_interruption_reproduces_the_uninterrupted_run(tmp_path, data):
    tok = tiny_tokenizer()
    kw = dict(steps=6, sft_steps=2, chat_data=data["chat"], chat_fraction=0.3, checkpoint_every=2, eval_every=3,
              grad_accum=2)
    base, teacher = compressed_pair()

    full = copy.deepcopy(base)
    ref = recover_(full, teacher, tok, config(data, **kw), run_dir=tmp_path / "a", progress=False)
    assert ref["steps"] == {"kd": 6, "sft": 2} and not ref["interrupted"]
    assert (tmp_path / "a" / "recover_curves.png").is_file() and (tmp_path / "a" / "recover.json").is_file()

    def kill_at_step_3(stage, step):  # a real SIGTERM, handled by the loop: checkpoint, then stop
        if stage == "kd" and step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    part = copy.deepcopy(base)
    stopped = recover_(part, teacher, tok, config(data, **kw), run_dir=tmp_path / "b", progress=False,
                       on_step=kill_at_step_3)
    assert stopped["interrupted"] and stopped["signal"] == signal.SIGTERM and stopped["steps"]["kd"] == 3
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored

    with pytest.raises(VacError, match="already holds a recovery checkpoint"):
        recover_(copy.deepcopy(base), teacher, tok, config(data, **kw), run_dir=tmp_path / "b", progress=False)
    with pytest.raises(VacError, match=r"different run configuration.*lr"):
        recover_(copy.deepcopy(base), teacher, tok, config(data, **{**kw, "lr": 1e-3}), run_dir=tmp_path / "b",
                 resume=True, progress=False)

    def crash_at_step_5(stage, step):  # like SIGKILL: no checkpoint at the crash, the periodic one (step 4) stays
        if stage == "kd" and step == 5:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        recover_(copy.deepcopy(base), teacher, tok, config(data, **kw), run_dir=tmp_path / "b", resume=True,
                 progress=False, on_step=crash_at_step_5)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 4

    resumed = copy.deepcopy(base)  # a fresh process would start from the same exported student
    out = recover_(resumed, teacher, tok, config(data, **kw), run_dir=tmp_path / "b", resume=True, progress=False)
    assert out["steps"] == {"kd": 6, "sft": 2} and not out["interrupted"]
    a, b = dict(full.named_parameters()), dict(resumed.named_parameters())
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    assert [r["loss"] for r in out["history"]["train"]] == pytest.approx([r["loss"] for r in ref["history"]["train"]],
                                                                         abs=1e-6)
    assert out["after"]["student"]["ppl"] == pytest.approx(ref["after"]["student"]["ppl"], rel=1e-6)


def test_time_budget_fits_the_schedule(data):
    student, teacher = compressed_pair()
    res = recover_(student, teacher, tiny_tokenizer(), config(data, steps=0, max_minutes=0.02, eval_samples=0),
                   progress=False)
    assert res["steps"]["kd"] >= 3 and res["after"] is None


# --- probes ---------------------------------------------------------------------------------------------------------


def test_probe_checks():
    assert check_think("<think>7 and 5 make 12</think> The answer is 12.")[0]
    assert not check_think("The answer is 12.")[0]
    assert not check_think("<think>still thinking")[0]
    assert not check_think("<think>a</think>")[0]  # no answer after the reasoning
    assert not check_think("<think>a</think> b </think> c")[0]
    think = Probe("t", "q", regex=r"(?<![0-9])12(?![0-9])", think=True)
    assert check_output(think, "<think>hmm</think> 12")["passed"]
    assert not check_output(think, "<think>12</think> 13")["passed"]  # the number must be in the answer
    plain = default_probes(tiny_tokenizer())[0]
    assert check_output(plain, "It is 12.")["passed"] and not check_output(plain, "w125")["passed"]
    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}<think>"
    assert default_probes(tok)[0].think
    with pytest.raises(VacError, match="unknown keys"):
        probes_from_config([{"prompt": "hi", "expected": "x"}])


def test_probes_run_on_a_model():
    out = run_probes(tiny_model(), tiny_tokenizer(), [Probe("p", "w1 w2", regex="w", max_new_tokens=4)])
    assert out[0]["name"] == "p" and isinstance(out[0]["output"], str) and set(out[0]["checks"]) == {"regex"}


# --- configuration and CLI ----------------------------------------------------------------------------------------


def test_shipped_recovery_preset_parses(tmp_path):
    rcfg = make_recover_config(load_recover_yaml(ROOT / "configs" / "recover-default.yaml"))
    assert rcfg.attn_lr_mult == 10 and rcfg.temperature == 2 and rcfg.alpha == 0.7 and rcfg.chat_fraction == 0.2
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-4\nlearning_rate: 3\n")
    with pytest.raises(VacError, match="unknown keys"):
        load_recover_yaml(bad)
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(ROOT / "configs" / "accelerate-fsdp-7b.yaml"))
    assert str(fsdp.distributed_type).endswith("FSDP") and fsdp.fsdp_config["fsdp_version"] == 2


def test_cli_recovers_an_exported_checkpoint(tmp_path, data):
    from transformers import AutoModelForCausalLM

    from vac.export import export

    teacher_dir = tmp_path / "teacher"
    teacher = write_tiny_checkpoint(teacher_dir)
    student = copy.deepcopy(teacher)
    result = compress_(student, make_config(dict(method="svd", ratio=2.0)), random_blocks(4, 32), progress=False)
    export(student, tiny_tokenizer(), tmp_path / "student", vac_meta={"ranks": result.ranks})
    out = tmp_path / "recovered"
    rc = main(["--student", str(tmp_path / "student"), "--teacher", str(teacher_dir), "--out", str(out),
               "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--pretrain-data", data["corpus"],
               "--eval-data", data["corpus"], "--eval-samples", "2", "--wandb-mode", "disabled", "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recovery"]["steps"] == {"kd": 3}
    assert set(report["evaluation"]) >= {"dense", "compressed", "recovered"}
    assert report["recovery"]["probes"]["before"][0]["name"] == "arithmetic"
    assert json.loads((out / "config.json").read_text())["vac"]["recovered"]["steps"] == {"kd": 3}
    assert (out / "recover_curves.png").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model(input_ids=random_blocks(1, 8)).logits.shape[-1] == VOCAB
    assert main(["--student", str(tmp_path / "student"), "--teacher", str(teacher_dir), "--out", str(out)]) == 2
