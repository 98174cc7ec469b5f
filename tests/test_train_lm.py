"""The causal-LM text pipeline (egg_recipes.text) and recipes/train_lm.py on both routes (tiny models, seconds)."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("datasets")
pytest.importorskip("transformers")

from egg_recipes.data import DatasetUnavailableError
from egg_recipes.text import (
    IGNORE_INDEX,
    ByteTokenizer,
    CausalLMCollator,
    group_texts,
    load_text_dataset,
    load_tokenizer,
    make_lm_dataloader,
    token_nll,
    tokenize_and_group,
)
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
# the corpus generator is a script beside its data, not a module of a package
make_tiny_tales = SimpleNamespace(**runpy.run_path(str(ROOT / "recipes" / "data" / "make_tiny_tales.py")))
from egg_recipes import train_lm  # noqa: E402

TINY = [
    "--hidden-size", "32", "--layers", "1", "--heads", "2", "--intermediate-size", "64", "--block-size", "32",
    "--batch-size", "8", "--lr", "1e-2", "--warmup-steps", "0", "--report-to", "none", "--no-progress",
]  # fmt: skip


def _lines(n: int, tag: str) -> str:
    return "".join(f"{tag} line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(n))


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder of two text files, 120 lines, ~7 KB: ~220 blocks of 32 bytes."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text(_lines(70, "alpha"))
    (folder / "b.txt").write_text(_lines(50, "beta"))
    return folder


def _run(argv, out: Path) -> dict:
    return train_lm.train(train_lm.parse_args([*TINY, "--output-dir", str(out), *argv]))


# ---------------------------------------------------------------------------- tokenisers
@settings(max_examples=60, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert all(0 <= i < 256 for i in ids[1:-1]) and len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text  # special ids are dropped
    assert tok.encode_batch([text, text[::-1]]) == [ids[1:-1], list(text[::-1].encode("utf-8"))]
    assert max(tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == tok.vocab_size - 1


def _save_word_tokenizer(folder: Path, corpus: Path) -> None:
    """A word-level tokenizer trained locally with `tokenizers` (no download), saved as a HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train(
        [str(p) for p in sorted(corpus.glob("*.txt"))], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"])
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(str(folder))


def test_local_hf_tokenizer_folder(tmp_path, corpus):
    _save_word_tokenizer(tmp_path / "tok", corpus)
    tok = load_tokenizer(tmp_path / "tok")
    ids = tok.encode_batch(["alpha line 3: the lazy dog."])[0]
    assert len(ids) == 6 and tok.pad_token_id == 1 and 1 not in ids and 0 not in ids  # known words, no [UNK]
    assert tok.decode(ids) == "alpha line 3: the lazy dog."
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)


# ---------------------------------------------------------------------------- loading and splits
def test_folder_of_text_files_splits_deterministically(corpus):
    train = load_text_dataset(corpus, split="train", validation_fraction=0.1)
    val = load_text_dataset(corpus, split="validation", validation_fraction=0.1)
    assert train.column_names == ["text"] and len(val) == 12 and len(train) == 108
    # the tail of the stream is the validation split: no overlap, nothing lost, line breaks kept
    stream = (corpus / "a.txt").read_text() + (corpus / "b.txt").read_text()
    assert "".join(train["text"]) + "".join(val["text"]) == stream
    assert val["text"][-1] == "beta line 49: the quick brown fox jumps over the lazy dog.\n"
    assert load_text_dataset(corpus, split="validation", validation_fraction=0.1)["text"] == val["text"]
    # one file, and a list of paths, go through the text builder
    one = load_text_dataset(corpus / "b.txt", split="validation", validation_fraction=0.1)
    assert one["text"] == val["text"][-5:]
    both = load_text_dataset([corpus / "a.txt", corpus / "b.txt"], split="train", validation_fraction=0.1)
    assert both["text"] == train["text"]


def test_folder_splits_and_other_formats_use_the_hub_code_path(tmp_path):
    """A folder goes through the same `datasets.load_dataset(name)` call as a Hub name: split files by name,
    any builder (json here) and the text-column detection."""
    split_folder = tmp_path / "splits"
    split_folder.mkdir()
    (split_folder / "train.txt").write_text(_lines(6, "t"))
    (split_folder / "validation.txt").write_text(_lines(2, "v"))
    (split_folder / "README.md").write_text("# a dataset card, not text to train on\n")
    assert load_text_dataset(split_folder, split="validation")["text"] == _lines(2, "v").splitlines(keepends=True)
    assert len(load_text_dataset(split_folder, split="train")) == 6
    json_folder = tmp_path / "jsonl"
    json_folder.mkdir()
    rows = [{"id": i, "content": f"document {i}"} for i in range(20)]
    (json_folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = load_text_dataset(json_folder, split="validation", validation_fraction=0.1)
    assert val["text"] == ["document 18", "document 19"]
    with pytest.raises(Exception, match="no text column 'body'"):
        load_text_dataset(json_folder, text_column="body")


def test_unreachable_hub_and_missing_paths_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_text_dataset("egg-optim-tests/no-such-text-dataset")  # HF_DATASETS_OFFLINE=1 in conftest
    assert "\n" not in str(info.value) and "offline choices" in str(info.value)
    with pytest.raises(DatasetUnavailableError, match="does not exist"):
        load_text_dataset(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------- blocks, batches, scores
def test_group_texts_blocks_and_remainder():
    examples = {"input_ids": [[1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]}
    assert group_texts(examples, 4) == {"input_ids": [[1, 2, 3, 4], [5, 6, 7, 8]]}
    assert group_texts(examples, 4, keep_remainder=True)["input_ids"][-1] == [9, 10]


def test_tokenize_and_group_keeps_the_stream_and_collate_masks_padding(corpus):
    tok = ByteTokenizer()
    raw = load_text_dataset(corpus, split="validation", validation_fraction=0.1)
    stream = list("".join(raw["text"]).encode("utf-8"))
    full = tokenize_and_group(raw, tok, 32)
    kept = tokenize_and_group(raw, tok, 32, keep_remainder=True)
    assert all(len(b) == 32 for b in full["input_ids"]) and len(full) == len(stream) // 32
    assert [i for b in kept["input_ids"] for i in b] == stream  # every token, in order
    batch = CausalLMCollator(tok.pad_token_id)([{"input_ids": [5, 6, 7]}, {"input_ids": torch.tensor([8])}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    loader = make_lm_dataloader(kept, 4, pad_token_id=tok.pad_token_id)
    assert sum(int(b["attention_mask"].sum()) for b in loader) == len(stream)


def test_token_nll_counts_real_tokens_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    ).eval()
    collate = CausalLMCollator(pad_token_id=0)
    long, short = list(range(1, 11)), [3, 4, 5, 6]
    with torch.no_grad():
        alone = collate([{"input_ids": short}])
        nll_alone, n_alone = token_nll(model(**alone).logits, alone["labels"])
        both = collate([{"input_ids": long}, {"input_ids": short}])
        out = model(input_ids=both["input_ids"], attention_mask=both["attention_mask"])
        nll, n = token_nll(out.logits, both["labels"])
        ref = model(input_ids=torch.tensor([long]), labels=torch.tensor([long])).loss  # HF's own mean NLL
    assert n.tolist() == [9, 3] and n_alone.tolist() == [3]  # a sequence of L tokens makes L - 1 predictions
    assert torch.allclose(nll[1], nll_alone[0], atol=1e-5)  # padding changes nothing
    assert math.isclose(float(nll[0]) / 9, float(ref), rel_tol=1e-5)


# ---------------------------------------------------------------------------- recipe
def test_default_corpus_output_mode_writes_a_loadable_model(tmp_path):
    """No --dataset: the shipped corpus. The saved plain model scores the reported perplexity."""
    from transformers import LlamaForCausalLM

    out = tmp_path / "run"
    m = _run(["--clone-mode", "output", "--max-steps", "8", "--max-eval-blocks", "24"], out)
    assert json.loads((out / "metrics.json").read_text())["perplexity"] == m["perplexity"]
    assert m["steps"] == 8 and m["train_tokens"] == 8 * 8 * 32 and m["tokens_per_second"] > 0
    assert m["eval_tokens"] == 24 * 31 and math.isclose(m["perplexity"], math.exp(m["eval_loss"]))
    assert m["perplexity"] < 0.5 * 259  # learned something: a uniform guess over 259 ids scores 259
    assert m["roles"]["clones"] > 0 and m["args"]["dataset"] == str(train_lm.DEFAULT_DATASET)
    from egg_recipes.text import evaluate_perplexity

    plain = LlamaForCausalLM.from_pretrained(str(out / "model"))
    tok = ByteTokenizer()
    _, eval_blocks = train_lm.load_blocks(train_lm.parse_args([*TINY, "--max-eval-blocks", "24"]), tok)
    again = evaluate_perplexity(plain, make_lm_dataloader(eval_blocks, 8, pad_token_id=tok.pad_token_id))
    assert math.isclose(again["perplexity"], m["perplexity"], rel_tol=1e-4)


def test_experts_train_a_mixtral_whose_saved_model_scores_what_the_run_reported(tmp_path):
    """--experts 4: a Mixtral-style LM, its expert neurons managed with equal shares per expert (output mode); the
    saved plain model loads and scores the reported perplexity; impossible expert flags are refused."""
    from egg_recipes.text import evaluate_perplexity
    from transformers import MixtralForCausalLM

    out = tmp_path / "moe"
    argv = ["--experts", "4", "--clone-mode", "output", "--max-steps", "4", "--max-eval-blocks", "16"]
    m = _run(argv, out)
    assert m["roles"]["clones"] > 0 and m["args"]["experts"] == 4
    plain = MixtralForCausalLM.from_pretrained(str(out / "model"))
    assert plain.config.num_local_experts == 4 and plain.config.num_experts_per_tok == 2
    tok = ByteTokenizer()
    _, eval_blocks = train_lm.load_blocks(train_lm.parse_args([*TINY, *argv]), tok)
    again = evaluate_perplexity(plain, make_lm_dataloader(eval_blocks, 8, pad_token_id=tok.pad_token_id))
    assert math.isclose(again["perplexity"], m["perplexity"], rel_tol=1e-4)
    for bad in (["--experts", "1"], ["--experts", "4", "--experts-per-token", "5"]):
        with pytest.raises(SystemExit):
            train_lm.parse_args([*TINY, *bad])


@pytest.mark.parametrize(("mode", "trainer"), [("weight", "accelerate"), ("output", "accelerate"), ("weight", "hf")])
def test_compiled_lm_trains_what_the_eager_loop_trains(tmp_path, corpus, mode, trainer, reset_accelerate):
    """--compile with the eager backend (the same ops): the probe forward (eval mode, no gradient) changes nothing
    and the transformer blocks' output mode is checked eagerly first, so a compiled run ends where the eager one
    does (weight mode bit-identical; output mode to rounding: both learn the same). ``--trainer hf`` passes
    ``torch_compile`` to the Trainer, and EggTrainer runs the probe pass."""
    common = ["--dataset", str(corpus), "--max-train-blocks", "24", "--max-steps", "6", "--clone-mode", mode,
              "--trainer", trainer]  # fmt: skip
    eager = _run(common, tmp_path / "eager")
    graph = _run([*common, "--compile", "default", "--compile-backend", "eager"], tmp_path / "compiled")
    if mode == "weight":
        assert graph["param_sha256"] == eager["param_sha256"]
    assert graph["steps"] == eager["steps"] == 6 and graph["roles"] == eager["roles"]
    assert math.isclose(graph["perplexity"], eager["perplexity"], rel_tol=1e-3)


@pytest.mark.parametrize("repack", [[], ["--repack"]])
def test_accelerate_resume_is_bit_identical(tmp_path, corpus, repack):
    """10 steps straight == 4 steps, checkpoint (mid-epoch), resume in a fresh Accelerator and model, 6 more:
    crosses 3 epoch starts (elections by gradient norm) under a cosine schedule; with ``--repack`` the blocks'
    units move at every election, in the saved model too."""
    common = ["--dataset", str(corpus), "--max-train-blocks", "24", "--max-steps", "10", "--epochs", "5",
              "--election", "grad_norm", "--elect-every", "epoch", "--warmup-steps", "2", *repack]  # fmt: skip
    straight = _run([*common, "--save-every", "4", "--keep-checkpoints", "0"], tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-4"
    progress = json.loads((ckpt / "egg_optim_checkpoint.json").read_text())["metadata"]["progress"]
    assert (progress["epoch"], progress["batch_in_epoch"]) == (1, 1)  # 3 batches per epoch
    resumed = _run([*common, "--resume-from", str(ckpt)], tmp_path / "b")
    assert resumed["resumed_from"] == str(ckpt) and straight["elections"] == 3
    for key in ("param_sha256", "roles_sha256", "perplexity", "elections", "steps", "train_tokens"):
        assert resumed[key] == straight[key], key
    # not vacuous: the checkpoint's weights are not the final ones
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    final = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    assert not torch.equal(saved["model.layers.0.mlp.up_proj.weight"], final["model.layers.0.mlp.up_proj.weight"])
    # a checkpoint of another run is refused (one line, exit 2)
    assert (
        train_lm.main([*TINY, "--output-dir", str(tmp_path / "c"), *common, "--seed", "1", "--resume-from", str(ckpt)])
        == 2
    )


def test_hf_trainer_route_logs_roles_resumes_and_takes_a_local_tokenizer(tmp_path, corpus, capsys):
    _save_word_tokenizer(tmp_path / "tok", corpus)
    common = ["--trainer", "hf", "--dataset", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--block-size", "8",
              "--max-steps", "6", "--log-every", "2", "--scenario", "aggressive"]  # fmt: skip
    straight = _run([*common, "--save-every", "3"], tmp_path / "a")
    assert straight["trainer"] == "hf" and straight["steps"] == 6 and straight["roles"]["clones"] > 0
    logged = [h for h in straight["log_history"] if "loss" in h]
    assert len(logged) == 3 and all("roles/total/clones" in h and "roles/total/updated_fraction" in h for h in logged)
    assert math.isfinite(straight["perplexity"]) and straight["eval_tokens"] > 0
    resumed = _run([*common, "--resume-from", str(tmp_path / "a" / "checkpoint-3")], tmp_path / "b")
    for key in ("param_sha256", "roles_sha256", "perplexity", "steps"):
        assert resumed[key] == straight[key], key
    assert resumed["train_tokens"] == 3 * 8 * 8  # only the steps this run made
    # another learning rate: refused before training, naming the setting
    changed = [*TINY, *common, "--lr", "5e-3", "--output-dir", str(tmp_path / "c")]
    capsys.readouterr()
    assert train_lm.main([*changed, "--resume-from", str(tmp_path / "a" / "checkpoint-3")]) == 2
    assert "lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--trainer", "keras"], "invalid choice: 'keras'"),
        (["--heads", "3"], "3 does not divide --hidden-size 32"),
        (["--block-size", "1"], "at least 2 tokens"),
        (["--validation-fraction", "1"], "in (0, 1)"),
        (["--scenario", "bogus"], "invalid choice: 'bogus'"),
        (["--lr", "0"], "expected a positive number"),
        (["--compile-backend", "eager"], "give --compile too"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as info:
        train_lm.main([*TINY, *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--dataset", "/no/such/texts"], "does not exist"),
        (["--dataset", "egg-optim-tests/no-such-hub-dataset"], "cannot load dataset"),
        (["--tokenizer", "/no/such/tokenizer"], "does not exist"),
        (["--block-size", "10000000"], "shorter than one block"),
    ],
)
def test_bad_inputs_exit_2_without_traceback(argv, fragment, tmp_path, capsys):
    assert train_lm.main([*TINY, "--output-dir", str(tmp_path), "--max-steps", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


def test_shipped_corpus_is_the_generators_output():
    assert make_tiny_tales.main(["--check"]) == 0
    text = make_tiny_tales.OUTPUT.read_text(encoding="utf-8")
    assert 200_000 < len(text.encode("utf-8")) < 400_000 and text.isascii()


def test_wandb_offline_logs_role_metrics_and_perplexity(tmp_path, corpus, monkeypatch):
    pytest.importorskip("wandb")
    from egg_recipes.tracking import history_keys, read_wandb_offline_history

    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "wb").mkdir()
    argv = ["--dataset", str(corpus), "--report-to", "wandb", "--max-steps", "4", "--log-every", "2",
            "--eval-every", "2", "--log-per-layer"]  # fmt: skip
    m = _run(argv, tmp_path / "run")
    (run,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    rows = read_wandb_offline_history(run, timeout=60)  # the W&B service writes asynchronously
    keys = history_keys(rows)
    layer = "roles/model.layers.0.mlp"  # a block: the MLP's hidden neurons
    for key in (f"{layer}/leaders", f"{layer}/clones", f"{layer}/updated_fraction", "roles/total/clones",
                "train/loss", "train/lr", "eval/perplexity", "final/perplexity"):  # fmt: skip
        assert key in keys, key
    by_step = {r["_step"]: r for r in rows if "eval/perplexity" in r}
    assert sorted(by_step) == [2, 4] and by_step[4]["eval/perplexity"] == m["perplexity"]
    assert next(r for r in rows if f"{layer}/leaders" in r)[f"{layer}/leaders"] == round(0.4 * 64)  # mild, 64 units
