"""Packs (tuneline.core.packs): item files grouped into tars of bounded count, read at their offsets; the
store keeps one copy, an unchanged group links the pack it had, and a new item writes one pack."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from conftest import save_photo
from tuneline.core.packs import PackItem, pack_of, read_member, write_tar
from tuneline.core.store import ItemStore


def test_a_pack_is_a_plain_deterministic_tar_read_at_the_recorded_offsets(tmp_path):
    members = [("a.png", b"\x89PNG" + bytes(range(256)) * 3), ("b.txt", b""), ("c.bin", os.urandom(1025))]
    places = write_tar(tmp_path / "one.tar", members)
    assert write_tar(tmp_path / "two.tar", members) == places
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()  # no times, users or modes vary
    with tarfile.open(tmp_path / "one.tar") as archive:  # what `tar -xf` and webdataset read
        assert [(m.name, m.size, m.mtime, m.mode) for m in archive.getmembers()] == [
            (name, len(data), 0, 0o444) for name, data in members]
        for name, data in members:
            assert archive.extractfile(name).read() == data
            ref = {"pack": "one.tar", "member": name, "offset": places[name][0], "size": places[name][1]}
            assert read_member(tmp_path, ref) == data


def test_pack_names_come_from_the_content_id_and_stay_bounded():
    ids = [f"{n:024x}" for n in range(0, 16**24, 16**24 // 20_000)][:20_000]
    for digits in (1, 2, 3):
        assert len({pack_of("set", item_id, digits) for item_id in ids}) == 16**digits
    assert pack_of("set", "abc123", 2) == "set/ab"


def _stored(store: ItemStore, key: str, data: bytes) -> PackItem:
    path = store.path(key, ".bin")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return PackItem(f"set/{key[:3]}", f"{key}.bin", key, ".bin")


def test_packing_keeps_one_copy_reuses_unchanged_packs_and_finds_items_after_their_loose_file_is_gone(tmp_path):
    store = ItemStore(tmp_path / "store", "stage")
    data = {key: key.encode() * 50 for key in ("aaa1", "aaa2", "bbb1")}
    items = [_stored(store, key, value) for key, value in data.items()]

    first = store.pack(tmp_path / "out1", items, ".tar")
    assert sorted(p.relative_to(tmp_path / "out1").as_posix() for p in (tmp_path / "out1").rglob("*.tar")) == [
        "set/aaa.tar", "set/bbb.tar"]
    for item in items:
        assert not store.path(item.key, ".bin").exists()  # packed: the pack is the one copy
        assert store.has(item.key, ".bin") and store.read_bytes(item.key, ".bin") == data[item.key]
        assert read_member(tmp_path / "out1", first[(item.pack, item.name)]) == data[item.key]
    packs = sorted((store.root / "packs").glob("*/*.tar"))
    assert len(packs) == 2 and all(p.stat().st_nlink == 2 for p in packs)  # the store's, linked into out1

    # The same items again: the same packs are linked, nothing is read or written.
    inodes = {p: p.stat().st_ino for p in packs}
    assert store.pack(tmp_path / "out2", items, ".tar") == first
    assert sorted((store.root / "packs").glob("*/*.tar")) == packs and all(p.stat().st_ino == inodes[p] for p in packs)

    # A new item beside aaa1 and aaa2: their pack is written anew (from the old pack's bytes), bbb's is linked.
    [old_aaa] = [p for p in packs if os.path.samefile(p, tmp_path / "out1/set/aaa.tar")]
    grown = items + [_stored(store, "aaa3", b"new")]
    refs = store.pack(tmp_path / "out3", grown, ".tar")
    out1, out3 = tmp_path / "out1", tmp_path / "out3"
    assert os.path.samefile(out1 / "set/bbb.tar", out3 / "set/bbb.tar")
    assert not os.path.samefile(out1 / "set/aaa.tar", out3 / "set/aaa.tar")
    assert [read_member(out3, refs[(i.pack, i.name)]) for i in grown] == [*data.values(), b"new"]
    # The old aaa pack is superseded (the new one holds both its items): gone from the store and its index,
    # so an added image leaves no second copy of its group; out1, the old output, still links its bytes.
    stored = sorted((store.root / "packs").glob("*/*.tar"))
    assert {p.stat().st_ino for p in stored} == {p.stat().st_ino for p in out3.rglob("*.tar")}
    assert not old_aaa.exists() and store.index.members(old_aaa.stem) == {}
    assert read_member(out1, first[("set/aaa", "aaa1.bin")]) == data["aaa1"]
    assert [store.read_bytes(i.key, ".bin") for i in grown] == [*data.values(), b"new"]

    # Back to the first items (the new image removed again): aaa's first pack is written again from the
    # newer pack's bytes, byte for byte, and the newer pack stays (aaa3 is in no other pack).
    assert store.pack(tmp_path / "out4", items, ".tar") == first
    assert (tmp_path / "out4/set/aaa.tar").read_bytes() == (out1 / "set/aaa.tar").read_bytes()
    assert len(list((store.root / "packs").glob("*/*.tar"))) == 3
    assert store.read_bytes("aaa3", ".bin") == b"new"


def test_a_new_image_writes_one_pack_of_the_bucket_output(project):
    for index in range(6):
        save_photo(project.raw("alpha") / f"a{index}.jpg", (160 + 8 * index, 120), index)
    project.ingest(), project.bucket()
    folder = project.root / "data/bucketed"
    before = {p.relative_to(folder): p.stat().st_ino for p in folder.rglob("*.tar")}
    save_photo(project.raw("alpha") / "new.jpg", (150, 130), 99)
    project.ingest()
    assert project.bucket().computed == 1
    after = {p.relative_to(folder): p.stat().st_ino for p in folder.rglob("*.tar")}
    changed = {pack for pack in after if before.get(pack) != after[pack]}
    [new] = [r for r in project.manifest("data/bucketed") if r["source"].endswith("new.jpg")]
    assert changed == {Path(new["image"]["pack"])}  # one pack written, every other one linked as it was
    # The store holds the output's packs and nothing more: the pack the new image's group had is gone.
    packs = (project.root / ".tuneline/store/bucket/packs").glob("*/*.tar")
    assert sorted(p.stat().st_ino for p in packs) == sorted(after.values())
    with tarfile.open(folder / new["image"]["pack"]) as archive:
        assert f"{new['id']}.png" in archive.getnames()
    assert io.BytesIO(read_member(folder, new["image"])).read(4) == b"\x89PNG"


def test_changing_pack_digits_repacks_and_recomputes_nothing(project):
    for index in range(6):
        save_photo(project.raw("alpha") / f"a{index}.jpg", (160 + 8 * index, 120), index)
    project.ingest(), project.bucket()
    folder = project.root / "data/bucketed"
    before = {r["id"]: read_member(folder, r["image"]) for r in project.manifest("data/bucketed")}
    project.params_data["pack_digits"] = 1
    report = project.bucket()
    assert (report.computed, report.reused) == (0, 6)
    records = project.manifest("data/bucketed")
    assert {r["image"]["pack"] for r in records} == {f"alpha/{r['id'][0]}.tar" for r in records}
    assert {r["id"]: read_member(folder, r["image"]) for r in records} == before
