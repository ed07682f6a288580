"""`mmpretrain data build`: JSONL pairs, LLaVA conversations, interleaved documents and WebDataset
tars become MDS shards; bad records are skipped and counted by reason; the summary is saved."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from mmpretrain.data.build import build
from mmpretrain.data.formats import conversation_segments
from mmpretrain.data.shards import ShardReader
from PIL import Image
from test_decode import _png_header_only

from mmpretrain.cli import main

ROOT = Path(__file__).resolve().parent.parent


def png(seed=0, size=(24, 32)):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(
        buf, "PNG")
    return buf.getvalue()


def make_inputs(root):
    (root / "img").mkdir(parents=True)
    for k in range(3):
        (root / "img" / f"{k}.png").write_bytes(png(k))
    (root / "img" / "broken.png").write_bytes(png(9)[:40])
    (root / "img" / "huge.png").write_bytes(_png_header_only(30000, 30000))
    lines = [
        {"image": "img/0.png", "text": "a pair"},
        {"image": "img/1.png", "caption": "another pair"},
        {"image": ["img/0.png", "img/2.png"], "conversations": [
            {"from": "human", "value": "<image>\nand <image> - what differs?"},
            {"from": "gpt", "value": "the colours."}]},
        {"segments": [{"text": "intro"}, {"image": "img/2.png"}, {"text": "outro"}]},
        {"texts": ["before", None, "after"], "images": [None, "img/1.png", None]},
        {"image": "img/missing.png", "text": "no file"},
        {"image": "img/broken.png", "text": "cut short"},
        {"image": "img/huge.png", "text": "a bomb"},
        {"image": "img/0.png", "text": "   "},
        {"what": "ever"},
    ]
    (root / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    with tarfile.open(root / "wds.tar", "w") as tar:
        for key, members in [("a", {"jpg": png(5), "txt": b"tar caption"}),
                             ("b", {"png": png(6), "json": b'{"caption": "json caption"}'}),
                             ("c", {"txt": b"no image"})]:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def test_build_converts_every_format_and_counts_skips(tmp_path):
    src = make_inputs(tmp_path / "src")
    summary = build([str(src / "data.jsonl"), str(src / "wds.tar")], tmp_path / "out", workers=0,
                    max_pixels=100_000_000, progress=False)
    assert summary["written"] == 7
    assert summary["skipped"] == {"bad_record": 2, "empty_text": 1, "missing_file": 2,
                                  "oversize_image": 1, "undecodable_image": 1}
    assert summary["bytes"] > 0 and json.loads((tmp_path / "out" / "build_summary.json").read_text())
    assert any("missing.png" in m for m in summary["skip_examples"]["missing_file"])
    skips = [json.loads(x) for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert Counter(x["reason"] for x in skips) == summary["skipped"]  # every one, not 5 a reason
    assert {x["message"] for x in skips} >= {
        m for ms in summary["skip_examples"].values() for m in ms}
    samples = list(ShardReader(tmp_path / "out"))
    assert [s["kind"] for s in samples] == ["caption"] * 2 + ["conversation"] + ["interleaved"] * 2 \
        + ["caption"] * 2
    conv = samples[2]
    assert [("image" if "image" in s else s["text"]) for s in conv["segments"]] == \
        ["user: ", "image", "and ", "image", " - what differs?\nassistant: the colours."]
    assert conv["images"] == [png(0), png(2)]
    assert samples[3]["segments"] == [{"text": "intro"}, {"image": 0}, {"text": "outro"}]
    assert samples[6]["segments"][-1] == {"text": "json caption"}


def test_records_of_the_wrong_shape_are_skipped_not_fatal(tmp_path):
    (tmp_path / "a.png").write_bytes(png(0))
    lines = [{"image": "a.png", "text": "kept"}, {"segments": []}, {"segments": 5},
             {"segments": {"text": "x"}}, {"texts": ["a", None], "images": 5},
             {"texts": ["a", None, "b"], "images": [None, "a.png"]},
             {"image": "a.png", "conversations": [{"from": "human", "value": ["x"]}]},
             {"image": "a.png", "conversations": [{"value": "<image> no role"}]},
             {"image": "a.png", "conversations": ["<image> not an object", {"from": "gpt", "value": "a"}]}]
    lines.insert(1, {"image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"}]})
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = build([str(tmp_path / "in.jsonl")], tmp_path / "out", workers=0, progress=False)
    assert summary["written"] == 1
    assert summary["skipped"] == {"empty_text": 1, "bad_record": 8}
    assert any("2 <image> placeholders for 1 image" in m for m in summary["skip_examples"]["bad_record"])
    assert all("in.jsonl" in m for m in summary["skip_examples"]["bad_record"])


def test_workers_give_the_same_shards_and_the_cli_prints_the_summary(tmp_path, capsys):
    src = make_inputs(tmp_path / "src")
    inline = build([str(src)], tmp_path / "a", workers=0, progress=False)
    assert main(["data", "build", "--input", str(src), "--out", str(tmp_path / "b"),
                 "--workers", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["written"] == inline["written"] and printed["skipped"] == inline["skipped"]
    assert list(ShardReader(tmp_path / "a")) == list(ShardReader(tmp_path / "b"))
    assert main(["data", "build", "--input", str(src / "nope.jsonl"), "--out",
                 str(tmp_path / "c")]) == 2


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_a_tar_cut_short_keeps_what_came_before_and_the_other_inputs(tmp_path, suffix):
    """A partial download: the keys before the damage are written, the rest of that tar is one
    counted `damaged_tar` skip naming the file, and the other inputs are built as before."""
    src = make_inputs(tmp_path / "src")
    whole = tmp_path / f"whole{suffix}"
    with tarfile.open(whole, "w:gz" if suffix == ".tar.gz" else "w") as tar:
        for key in range(6):
            for ext, data in {"png": png(key), "txt": f"caption {key}".encode()}.items():
                info = tarfile.TarInfo(f"k{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    cut = src / "cut.tar"  # .tar: the reader opens any compression the stream has
    cut.write_bytes(whole.read_bytes()[: int(whole.stat().st_size * 0.6)])
    summary = build([str(src / "wds.tar"), str(cut), str(src / "data.jsonl")], tmp_path / "out",
                    max_pixels=100_000_000, progress=False)
    assert summary["skipped"]["damaged_tar"] == 1
    assert "cut.tar" in summary["skip_examples"]["damaged_tar"][0]
    captions = [seg["text"] for s in ShardReader(tmp_path / "out") for seg in s["segments"]
                if "text" in seg]
    kept = [c for c in captions if c.startswith("caption ")]
    assert kept and kept == [f"caption {k}" for k in range(len(kept))] and len(kept) < 6
    assert "tar caption" in captions and "a pair" in captions  # the inputs around it


def six_key_tar(path: Path, compression: str = "") -> list[int]:
    """A tar of keys k0..k5 (png + txt); the byte offsets of the members' headers."""
    with tarfile.open(path, f"w:{compression}" if compression else "w") as tar:
        for key in range(6):
            for ext, data in {"png": png(key), "txt": f"caption {key}".encode()}.items():
                info = tarfile.TarInfo(f"k{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def flip_header(data: bytes, at: int) -> bytes:
    return data[:at + 5] + bytes([data[at + 5] ^ 0xFF]) + data[at + 6:]


@pytest.mark.parametrize("damage", ["header", "cut in a header", "cut between members"])
def test_a_tar_damaged_at_a_header_is_counted_not_taken_for_its_end(tmp_path, damage):
    """tarfile takes a bad or cut header after the first member for the end of the archive and
    says nothing: the keys before it are written, but the one read last (its members could go on
    past the damage), and the rest is one `damaged_tar` skip."""
    whole = tmp_path / "whole.tar"
    offsets = six_key_tar(whole)
    at, data = offsets[6], whole.read_bytes()  # k3's first member
    broken = {"header": flip_header(data, at), "cut in a header": data[:at + 100],
              "cut between members": data[:at]}[damage]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "b.tar").write_bytes(broken)
    summary = build([str(tmp_path / "src" / "b.tar")], tmp_path / "out", progress=False)
    assert summary["written"] == 2 and summary["skipped"] == {"damaged_tar": 1}, summary
    summary = build([str(whole)], tmp_path / "whole-out", progress=False)  # intact: no skip
    assert summary["written"] == 6 and summary["skipped"] == {}


def test_a_directory_input_reads_compressed_tars_and_names_what_it_leaves(tmp_path, caplog):
    src = make_inputs(tmp_path / "src")
    (src / "img").rename(tmp_path / "img")  # the directory input holds its inputs only
    (src / "data.jsonl").write_text((src / "data.jsonl").read_text().replace('"img/', '"../img/'))
    six_key_tar(src / "more.tar.gz", "gz")
    six_key_tar(src / "UPPER.TAR")
    (src / "README.txt").write_text("about this data")
    gif = io.BytesIO()
    Image.open(io.BytesIO(png(7))).save(gif, "GIF")
    with tarfile.open(src / "gif.tar", "w") as tar:  # a GIF member, as the JSONL path takes them
        for name, data in (("g.gif", gif.getvalue()), ("g.txt", b"a gif")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    summary = build([str(src)], tmp_path / "out", max_pixels=100_000_000, progress=False)
    captions = [seg["text"] for s in ShardReader(tmp_path / "out") for seg in s["segments"]
                if "text" in seg]
    assert captions.count("caption 0") == 2 and "a gif" in captions
    assert summary["written"] == 5 + 2 + 12 + 1
    assert "1 file(s) not read (not .jsonl, .json or .tar): README.txt" in caplog.text


def test_a_build_that_writes_nothing_fails_and_leaves_nothing(tmp_path, capsys):
    src = make_inputs(tmp_path / "src")
    (src / "info.json").write_text('  {"name": "a stray dataset_info.json"}')
    for args, needle in [(["--input", str(src / "data.jsonl"), "--max-pixels", "0"],
                          "--max-pixels 0: must be positive"),
                         (["--input", str(src / "data.jsonl"), "--input", str(src / "info.json")],
                          "info.json: a .json input holds an array"),
                         (["--input", str(src / "data.jsonl"), "--max-pixels", "10"],
                          "no sample written, every record skipped")]:
        assert main(["data", "build", *args, "--out", str(tmp_path / "out")]) == 2
        assert needle in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_conversation_images_without_placeholders_go_first():
    segs = conversation_segments([{"from": "human", "value": "describe"},
                                  {"from": "gpt", "value": "a dog"}], 1)
    assert segs == [{"image": 0}, {"text": "user: describe\nassistant: a dog"}]


def test_a_json_array_builds_as_its_lines_do(tmp_path):
    """LLaVA ships its instruction data as one JSON array: the same records as JSONL lines give
    the same samples."""
    src = make_inputs(tmp_path / "src")
    lines = [json.loads(x) for x in (src / "data.jsonl").read_text().splitlines()[:-1]]
    (src / "data.json").write_text(json.dumps(lines))
    a = build([str(src / "data.jsonl")], tmp_path / "a", progress=False)
    b = build([str(src / "data.json")], tmp_path / "b", progress=False)
    assert b["written"] == a["written"] == 5 and b["skipped"] == {**a["skipped"], "bad_record": 1}
    assert list(ShardReader(tmp_path / "a")) == list(ShardReader(tmp_path / "b"))
    assert any("data.json[5]" in m for m in b["skip_examples"]["missing_file"])


def test_refused_inputs_leave_no_output_and_shard_size_is_honoured(tmp_path, capsys):
    src = make_inputs(tmp_path / "src")
    (src / "notes.txt").write_text("x")
    (src / "object.json").write_text('{"image": "img/0.png", "text": "not in an array"}')
    out = tmp_path / "out"
    for inputs, needle in [([src / "notes.txt"], "not a .jsonl, .json or .tar file"),
                           ([src / "data.jsonl", src / "object.json"], "an array of records"),
                           ([src / "img"], "no .jsonl, .json or .tar files")]:
        args = [a for i in inputs for a in ("--input", str(i))]
        assert main(["data", "build", *args, "--out", str(out)]) == 2
        assert needle in capsys.readouterr().err and not out.exists()
    out.mkdir()  # an empty directory given as --out stays, empty
    assert main(["data", "build", "--input", str(src / "object.json"), "--out", str(out)]) == 2
    assert out.is_dir() and not any(out.iterdir())
    assert main(["data", "build", "--input", str(src / "data.jsonl"), "--out", str(tmp_path / "s"),
                 "--shard-size", "0"]) == 2
    assert "--shard-size" in capsys.readouterr().err
    for flag, value, needle in [("--heldout-every", "1", "1 would leave train/ empty"),
                                ("--workers", "-1", "--workers -1: must be 0")]:
        assert main(["data", "build", "--input", str(src / "data.jsonl"), "--out",
                     str(tmp_path / "s"), flag, value]) == 2
        assert needle in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert main(["data", "build", "--input", str(src / "data.jsonl"), "--out", str(tmp_path / "s"),
                 "--shard-size", "2KB"]) == 0
    assert len(list((tmp_path / "s").glob("shard.*.mds"))) >= 5  # one or two images a shard
    assert len(list(ShardReader(tmp_path / "s"))) == 5


def test_users_data_with_its_own_tokenizer_and_heldout_split_trains_and_evaluates(tmp_path, capsys):
    """`data build --heldout-every 3` writes train/ and heldout/; `data tokenizer` into the same
    directory trains the project's tokenizer (specials at their ids) on train/'s text; that
    directory is then a `data.path` that `train` and `eval` use."""
    from mmpretrain.data.specials import ROLES_FILE
    from mmpretrain.data.tokenizer import SPECIAL_TOKENS, TextTokenizer

    src = make_inputs(tmp_path / "src")
    built = tmp_path / "built"
    assert main(["data", "build", "--input", str(src), "--out", str(built), "--heldout-every", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 7 and summary["heldout"] == 2
    assert len(list(ShardReader(built / "train"))) == 5 and len(list(ShardReader(built / "heldout"))) == 2
    args = ["data", "tokenizer", "--input", str(built), "--out", str(built), "--vocab-size", "300"]
    (built / ROLES_FILE).write_text('{"eos": "</s2>"}')  # left by an adopted tokenizer: removed
    assert main(args) == 0
    printed = capsys.readouterr()
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary["samples"] == 5 and summary["characters"] > 0  # train/ only
    assert "tokenizer: read 5/5 samples" in printed.err and not (built / ROLES_FILE).exists()
    tok = TextTokenizer.load(built / "tokenizer.json")
    assert [tok.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.decode(tok.encode("another pair")) == "another pair"
    assert main(args) == 2 and "already holds a tokenizer.json" in capsys.readouterr().err
    assert main(["data", "tokenizer", "--input", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "t2")]) == 2
    run, env = tmp_path / "run", {**os.environ, "OMP_NUM_THREADS": "1"}
    sets = [f"data.path={built}", "train.steps=2", "data.seq_length=128", "data.image_token_budget=16",
            "train.global_batch_size=2", "data.micro_batch_size=2"]
    cli = [sys.executable, "-m", "mmpretrain"]
    r = subprocess.run([*cli, "train", "jobs/tiny-d.yaml", "--run-dir", str(run),
                        *[a for x in sets for a in ("--set", x)]], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    r = subprocess.run([*cli, "eval", "--run", str(run)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["samples"] == 2


def test_a_split_without_samples_is_named(tmp_path):
    """A data.path whose train/ has an index but no sample (a build that wrote none) is a
    ConfigError naming it, not an error about the sample order's sizes."""
    from mmpretrain.data.build import COLUMNS
    from streaming import MDSWriter

    from mmpretrain.config import ConfigError, load
    from mmpretrain.dataset import _readers

    with MDSWriter(out=str(tmp_path / "d" / "train"), columns=COLUMNS):
        pass
    with pytest.raises(ConfigError, match=f"data.path '{tmp_path / 'd'}': {tmp_path / 'd' / 'train'} "
                       "has no samples"):
        _readers(load(None, [f"data.path={tmp_path / 'd'}"]), "train")
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].path .* has no samples"):
        _readers(load(None, [f"data.datasets=[{{path: {tmp_path / 'd'}}}]"]), "train")


def test_a_build_stopped_by_sigterm_leaves_no_output(tmp_path):
    """SIGTERM (a time limit, `timeout`, `docker stop`) cleans up as Ctrl-C does: exit 130, no
    partial output that a rerun would refuse as not empty."""
    import signal
    import time

    src = make_inputs(tmp_path / "src")
    code = ("import sys, time\nimport mmpretrain.data.build as b\nconvert = b.convert\n"
            "def slow(*a, **k):\n    time.sleep(0.3)\n    return convert(*a, **k)\n"
            "b.convert = slow\nfrom mmpretrain.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-c", code, "data", "build", "--input",
                            str(src / "data.jsonl"), "--out", str(out)], cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # inside the build loop
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err[-2000:]
    assert "data interrupted" in err and not out.exists()
