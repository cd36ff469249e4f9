"""Inputs that used to give silently wrong labels, unbounded work, or a `d2v check` "ok" for a run that
then fails: class folders (links, empty classes, stray images), validation shards that number other
class names, GLUE rows with a tab inside a field, brace patterns of a billion names, decompression
bombs, tars without the model's payload, unusable --run.init_from weights, a folder d2v-shard never
finished, another modality's config section, and shard sizes below one. All in process, no ranks."""
import gc
import io
import json
import shutil
import tarfile
import warnings

import pytest
from PIL import Image
from webdataset.shardlists import expand_urls

from d2v_scale.config import ConfigError, TextConfig
from d2v_scale.d2v import Data2Vec
from d2v_scale.data import DataError, ImageCodec, build_codec, find_shards
from d2v_scale.data.braces import count
from d2v_scale.errors import D2VError
from d2v_scale.evaluate.probe import probe
from d2v_scale.export import write_weights
from d2v_scale.preflight import finetune_preflight, preflight
from d2v_scale.presets import build_config, get_preset
from d2v_scale.pretrained import read_encoder
from data_prep.cli import main as d2v_shard
from data_prep.sink import ShardSink


def shard(*args):
    d2v_shard([*map(str, args)])


def refusal(*args) -> str:
    with pytest.raises(SystemExit) as e:
        shard(*args)
    assert str(e.value).startswith("d2v-shard: error: ")
    return str(e.value)


def png(path, size=(8, 8), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def index_of(folder):
    return json.loads((folder / "index.json").read_text())


def encoder_file(path, preset="vit_base_patch16_debug", **model):
    cfg = get_preset(preset)
    for k, v in model.items():
        setattr(cfg.model, k, v)
    write_weights(path, Data2Vec(cfg.model).encoder.state_dict(), cfg.to_dict(), "encoder")
    return path


def unwind_aborted_sink():
    """An aborted sink leaves webdataset's tar stream over its closed file, whose finalizer fails on a
    write; collected here, not inside a later test's `ast.parse` (3.11 reports that as a SystemError)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()


def image_preflight(data, out, **overrides):
    cfg, ds = build_config("vit_base_patch16_debug", None, data=str(data), out=str(out),
                           ds_config="ds_configs/zero2.json", **{"data.num_workers": 1, "data.sampling": "resample",
                                                                 **overrides})
    return preflight(cfg, ds, world=1)


# -- labels that are silently wrong -----------------------------------------------------------------------

def test_class_folders_follow_links_and_refuse_empty_classes_and_stray_images(tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    for i in range(2):
        png(src / "cat" / f"{i}.png")
        png(elsewhere / f"{i}.png")
    (src / "dog").symlink_to(elsewhere, target_is_directory=True)       # a class folder that is a link
    (src / "cat" / "loop").symlink_to(src, target_is_directory=True)    # a link back up: walked once
    shard("image", src, tmp_path / "a", "--workers", 1)
    assert index_of(tmp_path / "a")["samples"] == 4 and index_of(tmp_path / "a")["classes"] == 2
    assert json.loads((tmp_path / "a" / "classes.json").read_text()) == {"cat": 0, "dog": 1}

    (src / "empty").mkdir()
    assert "1 of 3 class folders hold no images (empty)" in refusal("image", src, tmp_path / "b")
    (src / "empty").rmdir()
    (src / "twin").symlink_to(src / "cat", target_is_directory=True)
    assert "class folders cat and twin are the same folder" in refusal("image", src, tmp_path / "b")
    (src / "twin").unlink()
    png(src / "stray.png")                                               # used to drop every label
    msg = refusal("image", src, tmp_path / "b")
    assert "2 class folders and 1 images beside them" in msg and "stray.png" in msg and "--labels none" in msg
    shard("image", src, tmp_path / "c", "--labels", "none", "--workers", 1)
    assert index_of(tmp_path / "c")["samples"] == 5 and index_of(tmp_path / "c")["classes"] == 0


def test_validation_shards_must_number_the_same_class_names(image_dir, image_shards, tmp_path):
    renamed = tmp_path / "renamed"                                        # circle -> zcircle: every number moves
    for folder in image_dir.iterdir():
        name = "zcircle" if folder.name == "circle" else folder.name
        for p in sorted(folder.glob("*.png"))[:3]:
            (renamed / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(p, renamed / name / p.name)
    shard("image", renamed, tmp_path / "val", "--workers", 1)
    val = tmp_path / "val"
    enc = encoder_file(tmp_path / "enc.safetensors")
    expect = "number their classes differently: class 0 is 'circle' in the first and 'square' in the second"
    with pytest.raises(DataError, match=expect):
        probe(str(enc), str(image_shards), str(val))
    with pytest.raises(DataError, match=expect):
        image_preflight(image_shards, tmp_path / "run", **{"eval.data": str(image_shards), "eval.val": str(val),
                                                           "eval.every": 5})
    cfg, ds = build_config("vit_base_patch16_ft_debug", None, task="image_classification", init=str(enc),
                           train=str(image_shards), val=str(val), out=str(tmp_path / "ft"),
                           ds_config="ds_configs/zero2.json", **{"data.num_workers": 1})
    with pytest.raises(DataError, match=expect):
        finetune_preflight(cfg, ds, world=1)
    same = tmp_path / "same"                                              # the same names: accepted
    shutil.copytree(renamed, same)
    (same / "zcircle").rename(same / "circle")
    shard("image", same, tmp_path / "val2", "--workers", 1)
    image_preflight(image_shards, tmp_path / "run", **{"eval.data": str(image_shards),
                                                       "eval.val": str(tmp_path / "val2"), "eval.every": 5})


def test_glue_rows_of_another_field_count_are_refused_with_their_line(spm_model, tmp_path):
    tsv = tmp_path / "train.tsv"
    rows = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\tthe cat sat\tthe cat sat down\t"
                                                     f"{'entailment' if i % 2 else 'not_entailment'}" for i in range(6)]
    rows.insert(3, '9\t"a quoted\tfield"\tthe dog\tentailment')           # a tab inside a quoted field: 5 fields
    tsv.write_text("\n".join(rows) + "\n")
    msg = refusal("glue", tsv, tmp_path / "a", "--spm", spm_model, "--task", "rte")
    assert f"{tsv}:4: 5 fields where the header has 4" in msg and "--skip_bad_rows" in msg
    msg = refusal("glue", tsv, tmp_path / "a", "--spm", spm_model, "--sentence1", "sentence1", "--sentence2",
                  "sentence2", "--label", "label")                       # named columns: no junk class either
    assert f"{tsv}:4: 5 fields where the header has 4" in msg
    shard("glue", tsv, tmp_path / "b", "--spm", spm_model, "--task", "rte", "--skip_bad_rows")
    index = index_of(tmp_path / "b")
    assert index["samples"] == 6 and index["glue"]["rows_left_out"] == 1
    assert json.loads((tmp_path / "b" / "classes.json").read_text()) == {"entailment": 0, "not_entailment": 1}
    qqp = tmp_path / "qqp.tsv"                   # QQP's recipe drops such rows (fairseq's awk NF==6), by default
    qqp.write_text("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t1\t2\ta?\tb?\t0\n2\t3\t4\tc?\td?\t1\n"
                   "3\t5\t6\te?\tf\tg?\t1\n")
    shard("glue", qqp, tmp_path / "q", "--spm", spm_model, "--task", "qqp")
    assert index_of(tmp_path / "q")["samples"] == 2 and index_of(tmp_path / "q")["glue"]["rows_left_out"] == 1


# -- unbounded work ------------------------------------------------------------------------------------------

def test_brace_patterns_are_counted_before_they_are_expanded(tmp_path):
    for p in ["a{1..3}b", "{a..g..2}", "{4..1}", "{2..-1}", "x{,.b}", "py{2.{5..7},3.{2,3}}", "{07..10}",
              r"{1\{2,3}", "{a}", "{}", "{1..10..3}{Z..a}", "{z..A..5}", "s{1..5}::t{a,b}", "{{a,b},{c..e}}"]:
        assert count(p) == len(expand_urls(p)), p
    with pytest.raises(DataError, match="expands to 1,000,000,000 names, more than the limit of 1,000,000"):
        find_shards(str(tmp_path / "x-{000000000..999999999}.tar"))
    with pytest.raises(DataError, match="expands to 100,000,000 names"):
        find_shards("s3://bucket/{0..9999}-{0..9999}.tar")
    with pytest.raises(DataError, match="unbalanced braces"):
        find_shards(str(tmp_path / "x-{0..3.tar"))


def test_images_above_the_pixel_limit_are_skipped_undecoded(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        png(src / f"{i}.png")
    png(src / "bomb.png", (13_000, 13_000), mode="1")                    # ~20 KB on disk, 169 Mpx
    shard("image", src, tmp_path / "a", "--workers", 1)
    skipped = json.loads((tmp_path / "a" / "skipped.json").read_text())
    assert index_of(tmp_path / "a")["samples"] == 3 and index_of(tmp_path / "a")["max_pixels"] == 64_000_000
    assert skipped[0]["input"] == "bomb.png" and "13000 x 13000 = 169,000,000 pixels is above the limit" \
        in skipped[0]["error"]
    assert "must be a number >= 1" in refusal("image", src, tmp_path / "b", "--max_pixels", 0)
    with open(src / "bomb.png", "rb") as f:
        sample = {"png": f.read(), "__key__": "x"}
    with pytest.raises(ValueError, match="169,000,000 pixels is above the limit of 64,000,000"):
        ImageCodec(32, (0.2, 1.0)).decode(sample)                        # the loaders' codec: the same limit
    small = io.BytesIO()
    Image.new("RGB", (40, 40)).save(small, format="PNG")
    cfg = build_config("vit_base_patch16_debug", None, **{"data.max_image_pixels": 1000})[0]
    with pytest.raises(ValueError, match="40 x 40 = 1,600 pixels is above the limit of 1,000"):
        build_codec(cfg).decode({"png": small.getvalue(), "__key__": "y"})
    with pytest.raises(ConfigError, match="--data.max_image_pixels=0: must be an integer >= 1"):
        build_config("vit_base_patch16_debug", None, **{"data.max_image_pixels": 0})


# -- `d2v check` says what the run would find ---------------------------------------------------------------

def test_check_refuses_shards_without_the_models_payload(tmp_path):
    for i in range(2):
        with tarfile.open(tmp_path / f"t-{i:06d}.tar", "w") as tf:
            for k in range(3):
                data = b"only words here\n"
                info = tarfile.TarInfo(f"{i}{k:05d}.txt")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"holds no image, audio or text payload, only \.txt, but the model is an? "
                                        "image encoder"):
        image_preflight(tmp_path, tmp_path / "run")


def test_check_reads_init_from_weights_against_the_model(image_shards, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04not a safetensors file" * 10)
    with pytest.raises(D2VError, match="is not a readable safetensors file"):
        image_preflight(image_shards, tmp_path / "run", **{"run.init_from": str(junk)})
    with pytest.raises(D2VError, match="not found"):
        image_preflight(image_shards, tmp_path / "run", **{"run.init_from": str(tmp_path / "nope.safetensors")})
    wide = encoder_file(tmp_path / "wide.safetensors", embed_dim=96, num_heads=4)   # crafted: another width
    with pytest.raises(ConfigError, match=r"does not fit the model of this config \(shapes differ: "):
        image_preflight(image_shards, tmp_path / "run", **{"run.init_from": str(wide)})
    cfg = get_preset("text_base_debug")
    cfg.model.text.vocab_size = 100
    other = tmp_path / "text.safetensors"
    write_weights(other, Data2Vec(cfg.model).encoder.state_dict(), cfg.to_dict(), "encoder")
    with pytest.raises(ConfigError, match=r"does not fit the model .*missing: encoder\.blocks.*unexpected: "
                                          r"encoder\.embed_positions"):
        image_preflight(image_shards, tmp_path / "run", **{"run.init_from": str(other)})
    fits = encoder_file(tmp_path / "fits.safetensors")
    image_preflight(image_shards, tmp_path / "run", **{"run.init_from": str(fits)})


def test_check_refuses_a_folder_d2v_shard_did_not_finish(image_shards, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with ShardSink(str(out / "shard-%06d.tar"), maxcount=2) as sink:
            for i in range(5):                                          # two full shards, then Ctrl-C
                sink.write({"__key__": f"{i:09d}", "png": (image_shards / "img-000000.tar").read_bytes()[:10]})
            raise KeyboardInterrupt
    unwind_aborted_sink()
    assert sorted(p.name for p in out.iterdir()) == ["d2v-shard.incomplete", "shard-000000.tar", "shard-000001.tar"]
    with pytest.raises(DataError, match=r"d2v-shard has not finished .* \(d2v-shard.incomplete is there"):
        image_preflight(out, tmp_path / "run")
    with pytest.raises(DataError, match="d2v-shard has not finished"):
        find_shards(str(out / "shard-{000000..000001}.tar"))
    old = tmp_path / "old"                                  # a writer before the marker: a .partial, no index
    old.mkdir()
    for name in ("shard-000000.tar", "shard-000001.tar"):
        shutil.copy(image_shards / "img-000000.tar", old / name)
    (old / "shard-000002.tar.partial").write_bytes(b"")
    with pytest.raises(DataError, match="shard-000002.tar.partial is there"):
        image_preflight(old, tmp_path / "run")
    assert not (image_shards / "d2v-shard.incomplete").exists()         # a finished run leaves no marker


def test_an_unfinished_prefix_on_s3_is_refused_too(s3, image_shards):
    tar = (image_shards / "img-000000.tar").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with ShardSink("s3://d2v-test/cut/shard-%06d.tar", maxcount=2) as sink:
            for i in range(5):
                sink.write({"__key__": f"{i:09d}", "png": tar[:10]})
            sink.uploader.wait()                                        # the two finished shards are up
            raise KeyboardInterrupt
    unwind_aborted_sink()
    for data in ("s3://d2v-test/cut/", "s3://d2v-test/cut/shard-{000000..000001}.tar"):
        with pytest.raises(DataError, match=r"d2v-shard has not finished s3://d2v-test/cut/ \(d2v-shard.incomplete"):
            find_shards(data)
    with ShardSink("s3://d2v-test/whole/shard-%06d.tar", maxcount=2) as sink:     # finished: no marker
        for i in range(3):
            sink.write({"__key__": f"{i:09d}", "png": tar[:10]})
    assert len(find_shards("s3://d2v-test/whole/").urls) == 2
    assert len(find_shards("s3://d2v-test/whole/index.json").urls) == 2


def test_another_modalitys_keys_and_shard_sizes_below_one_are_refused(image_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"--model.text.\* is set but this config builds the image encoder"):
        build_config("vit_base_patch16_debug", None, **{"model.text.vocab_size": 100})
    with pytest.raises(ConfigError, match=r"--model.image.\* is set but this config builds the audio encoder"):
        build_config("audio_base_debug", None, **{"model.image.img_size": 64})
    cfg = get_preset("vit_base_patch16_debug")                          # weights written when it was accepted
    cfg.model.text = TextConfig(vocab_size=100)
    write_weights(tmp_path / "old.safetensors", Data2Vec(cfg.model).encoder.state_dict(), cfg.to_dict(), "encoder")
    assert read_encoder(tmp_path / "old.safetensors").cfg.validate().model.text is None       # still load
    for bad in (0, -5):
        assert f"--maxcount {bad}: must be a number >= 1" in refusal("image", image_dir, tmp_path / "o",
                                                                      "--maxcount", bad)
    assert "--maxsize 0: must be a number >= 1" in refusal("image", image_dir, tmp_path / "o", "--maxsize", 0)
    assert not (tmp_path / "o").exists()
