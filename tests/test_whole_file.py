"""tracin._whole_file.whole_file: a file replaced whole, through a temporary file beside it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tracin import _whole_file
from tracin._whole_file import whole_file


@pytest.fixture
def no_umask_change(monkeypatch) -> int:
    """The umask, which may not be called after: setting the process-wide umask races with other
    threads' files."""
    mask = os.umask(0o022)
    os.umask(mask)

    def refused(mask):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", refused)
    return mask


def test_a_new_file_gets_the_umask_mode_without_changing_the_umask(tmp_path, no_umask_change):
    with whole_file(tmp_path / "new.bin", binary=True) as f:
        f.write(b"abc")
    assert (tmp_path / "new.bin").read_bytes() == b"abc"
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o666 & ~no_umask_change
    assert [p.name for p in tmp_path.iterdir()] == ["new.bin"]


def test_an_existing_file_is_replaced_keeping_its_mode(tmp_path, no_umask_change):
    path = tmp_path / "old.csv"
    path.write_text("old\n")
    path.chmod(0o640)
    inode = path.stat().st_ino
    with whole_file(path) as f:
        f.write("a,b\r\n")  # text, newline="": written as given
    assert path.read_bytes() == b"a,b\r\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert path.stat().st_ino != inode  # renamed over, not rewritten


def test_a_symbolic_link_is_followed_and_kept(tmp_path):
    target = tmp_path / "real" / "data.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    with whole_file(link, binary=True) as f:
        f.write(b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.bin"]


def test_a_name_as_long_as_the_folder_allows(tmp_path):
    path = tmp_path / ("n" * os.pathconf(tmp_path, "PC_NAME_MAX"))
    path.write_bytes(b"old")
    with whole_file(path, binary=True) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_error_while_writing_leaves_the_file_and_no_temporary_file(tmp_path, error):
    path = tmp_path / "kept.bin"
    path.write_bytes(b"old")
    with pytest.raises(error), whole_file(path, binary=True) as f:
        f.write(b"partial")
        raise error
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.bin"]


def test_a_hard_linked_file_is_written_in_place(tmp_path):
    path, other = tmp_path / "a.bin", tmp_path / "b.bin"
    path.write_bytes(b"old and longer")
    os.link(path, other)
    with whole_file(path, binary=True) as f:
        f.write(b"new")
    assert other.read_bytes() == b"new" and path.stat().st_ino == other.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_an_error_while_writing_a_hard_linked_file_leaves_it_under_every_name(tmp_path, error):
    """Written in place, but staged whole first: nothing reaches the file before the block ends."""
    path, other = tmp_path / "a.csv", tmp_path / "b.csv"
    path.write_text("old\n")
    os.link(path, other)
    with pytest.raises(error), whole_file(path) as f:
        f.write("a" * 100_000)
        f.flush()
        raise error
    assert path.read_text() == other.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_a_fifo_is_written_directly(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    read = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_bytes()), daemon=True)
    reader.start()
    with whole_file(fifo, binary=True) as f:
        f.write(b"through the pipe")
    reader.join(10)
    assert read == [b"through the pipe"] and stat.S_ISFIFO(fifo.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


def test_a_folder_is_refused_naming_the_path(tmp_path):
    with pytest.raises(IsADirectoryError, match="it is a folder"), whole_file(tmp_path):
        pass


def test_a_missing_folder_is_named(tmp_path):
    path = tmp_path / "absent" / "out.bin"
    with pytest.raises(FileNotFoundError, match=f"cannot write {path}: no file can be created in {path.parent}"):
        with whole_file(path, binary=True):
            pytest.fail("no file to write")
    assert not path.parent.exists()


@pytest.mark.parametrize("name", ["missing/../out.txt", "missing/deeper/../../out.txt"])
def test_parent_folders_after_a_missing_folder_fail_like_open(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError):
        open(name, "w")
    assert _whole_file.resolve(name) == os.path.join(tmp_path, name)  # kept as named
    with pytest.raises(FileNotFoundError, match=f"cannot write {name}: no file can be created in"):
        with whole_file(name):
            pytest.fail("no file to write")
    assert os.listdir(tmp_path) == []


_AS_A_USER = """
import os, sys
from tracin._whole_file import whole_file
folder = sys.argv[1]
os.chmod(os.path.join(folder, "locked.bin"), 0o444)
try:
    with whole_file(os.path.join(folder, "locked.bin"), binary=True) as f:
        f.write(b"new")
except PermissionError as e:
    print("locked:", e)
os.chmod(folder, 0o555)
try:
    with whole_file(os.path.join(folder, "open.bin"), binary=True) as f:
        f.write(b"partial")
        f.flush()
        raise ValueError
except ValueError:
    print("interrupted:", open(os.path.join(folder, "open.bin"), "rb").read())
with whole_file(os.path.join(folder, "open.bin"), binary=True) as f:
    f.write(b"new")
try:
    with whole_file(os.path.join(folder, "absent.bin"), binary=True) as f:
        f.write(b"new")
except PermissionError as e:
    print("absent:", e)
os.chmod(folder, 0o755)
"""


def test_permissions_as_a_process_without_override(tmp_path):
    """A read-only file is refused naming it (not silently replaced); a writable file in a read-only
    folder is written in place; a new file there is refused naming the folder. Run as root without
    the capability to override permissions (setpriv), as root would write anyway."""
    command = [sys.executable, "-c", _AS_A_USER, str(tmp_path)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    (tmp_path / "locked.bin").write_bytes(b"old")
    (tmp_path / "open.bin").write_bytes(b"old")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    lines = done.stdout.splitlines()
    assert lines == [
        f"locked: [Errno 13] cannot write {tmp_path / 'locked.bin'} (permission denied)",
        "interrupted: b'old'",
        f"absent: [Errno 13] cannot create {tmp_path / 'absent.bin'}: folder {tmp_path} does not allow new files",
    ]
    assert (tmp_path / "locked.bin").read_bytes() == b"old" and (tmp_path / "open.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked.bin", "open.bin"]


def test_temporary_names_are_short_and_unique(tmp_path, monkeypatch):
    """A temporary name already taken is skipped (O_EXCL), never opened."""
    names = iter(["taken000", "free0000"])
    monkeypatch.setattr(_whole_file.secrets, "token_hex", lambda n: next(names))
    taken = tmp_path / f"{_whole_file.TEMP_PREFIX}taken000.tmp"
    taken.write_bytes(b"someone else's")
    with whole_file(tmp_path / "out.bin", binary=True) as f:
        f.write(b"new")
    assert taken.read_bytes() == b"someone else's" and (tmp_path / "out.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken.name, "out.bin"]


def test_an_owner_this_process_cannot_give_means_writing_in_place(tmp_path, monkeypatch):
    path = tmp_path / "theirs.bin"
    path.write_bytes(b"old")
    inode = path.stat().st_ino
    real = os.stat

    def other_owner(p, *args, **kwargs):
        s = real(p, *args, **kwargs)
        return os.stat_result((s.st_mode, s.st_ino, s.st_dev, s.st_nlink, s.st_uid + 1, *s[5:]))

    def refused(fd, uid, gid):
        raise PermissionError(1, "not permitted")

    monkeypatch.setattr(_whole_file.os, "stat", other_owner)
    monkeypatch.setattr(_whole_file.os, "fchown", refused)
    with pytest.raises(KeyboardInterrupt), whole_file(path, binary=True) as f:
        f.write(b"partial")
        f.flush()
        raise KeyboardInterrupt
    assert Path(path).read_bytes() == b"old"
    with whole_file(path, binary=True) as f:
        f.write(b"new")
    assert Path(path).read_bytes() == b"new" and real(path).st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["theirs.bin"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="giving a link another owner needs root")
def test_a_link_planted_by_another_user_in_a_sticky_shared_folder_is_not_followed(tmp_path):
    """fs.protected_symlinks' rule, whatever the sysctl says: in a sticky world-writable folder a link
    is followed only if it is this user's or the folder owner's (also a link standing for a folder)."""
    shared, home = tmp_path / "tmp", tmp_path / "home"
    shared.mkdir()
    home.mkdir()
    shared.chmod(0o1777)
    precious = home / ".bashrc"
    precious.write_text("precious\n")
    for name, to in (("scores.csv", precious), ("new.npz", home / "keys"), ("dir", home)):
        (shared / name).symlink_to(to)
        os.lchown(shared / name, 4242, 4242)
    for path in (shared / "scores.csv", shared / "new.npz", shared / "dir" / ".bashrc"):
        with pytest.raises(PermissionError, match=rf"cannot write {path}: symbolic link .* \(uid 4242\)"):
            with whole_file(path) as f:
                f.write("planted\n")
    assert precious.read_text() == "precious\n" and sorted(p.name for p in home.iterdir()) == [".bashrc"]
    os.chown(shared, 4242, 4242)  # the folder's owner's links are followed, as are this user's
    with whole_file(shared / "dir" / ".bashrc") as f:
        f.write("theirs\n")
    os.lchown(shared / "scores.csv", 0, 0)
    with whole_file(shared / "scores.csv") as f:
        f.write("mine\n")
    assert precious.read_text() == "mine\n" and (shared / "scores.csv").is_symlink()


def test_a_link_loop_is_refused_naming_the_path(tmp_path):
    (tmp_path / "a.csv").symlink_to("b.csv")
    (tmp_path / "b.csv").symlink_to("a.csv")
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'a.csv'}: more than 40 symbolic links"):
        with whole_file(tmp_path / "a.csv"):
            pytest.fail("no file to write")


def test_links_relative_absolute_and_through_parent_folders_resolve_like_realpath(tmp_path, monkeypatch):
    (tmp_path / "x" / "y").mkdir(parents=True)
    (tmp_path / "x" / "up").symlink_to("..")
    (tmp_path / "abs").symlink_to(tmp_path / "x" / "y")
    (tmp_path / "x" / "y" / "f").symlink_to("../../abs/g")
    monkeypatch.chdir(tmp_path / "x")
    for name in ("up/x/y/f", "./up/abs/../x/./y//f", str(tmp_path / "abs" / "f"), "y/missing/f"):
        assert _whole_file.resolve(name) == os.path.realpath(name)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc/self/fd")
def test_a_pipe_named_through_a_magic_link_is_written_directly(tmp_path):
    """/dev/stdout into a pipe: /proc/self/fd/N leads to 'pipe:[...]', which no realpath can name;
    the path is opened as given (here this process's own pipe, directly and through a link)."""
    read, write = os.pipe()
    with os.fdopen(read, "rb") as pipe, os.fdopen(write, "wb") as ours:
        (tmp_path / "out.csv").symlink_to(f"/proc/self/fd/{write}")
        paths = [f"/proc/self/fd/{write}", tmp_path / "out.csv"]
        for path in paths:
            with whole_file(path) as f:
                f.write(f"to {path}\n")
        ours.close()
        assert pipe.read().decode() == "".join(f"to {path}\n" for path in paths)
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_name_ending_in_a_separator_is_refused_like_open(tmp_path):
    (tmp_path / "existing.npz").write_bytes(b"keep")
    for name in ("new.npz/", "existing.npz/"):
        path = f"{tmp_path}/{name}"
        with pytest.raises(IsADirectoryError, match=f"cannot write {path}: a name ending in '/' names a folder"):
            with whole_file(path, binary=True):
                pytest.fail("no file to write")
    assert (tmp_path / "existing.npz").read_bytes() == b"keep"
    assert [p.name for p in tmp_path.iterdir()] == ["existing.npz"]


def test_the_new_contents_reach_the_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    """fsync of the temporary file before os.replace (a crash after the rename must not leave an
    empty file), then of the folder, as the store's JSON writer does."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else os.fstat(fd).st_size
        events.append(("fsync", kind))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(_whole_file.os, "replace", lambda a, b: events.append(("replace",)) or real_replace(a, b))
    with whole_file(tmp_path / "out.csv") as f:
        f.write("a,b\n")
    assert events == [("fsync", 4), ("replace",), ("fsync", "folder")]
    assert (tmp_path / "out.csv").read_text() == "a,b\n"


@pytest.mark.skipif(os.name != "posix", reason="set-group-ID and sticky bits are POSIX")
def test_an_existing_file_keeps_its_set_group_id_and_sticky_bits(tmp_path):
    """The replacement gets every permission bit of the file it replaces, not just rwx (r297 M10)."""
    path = tmp_path / "tool.sh"
    path.write_text("old\n")
    os.chmod(path, 0o3750)
    if stat.S_IMODE(path.stat().st_mode) != 0o3750:
        pytest.skip("this file system does not keep set-group-ID and sticky bits on files")
    with whole_file(path) as f:
        f.write("new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o3750


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0, reason="giving a link another owner needs root")
def test_a_link_of_another_user_in_a_sticky_folder_others_cannot_write_is_followed(tmp_path):
    """fs.protected_symlinks refuses links in sticky folders that are world-writable only: in a sticky
    folder only its owner writes (0o1755), another user's link is followed as the kernel follows it (r297 M13)."""
    folder = tmp_path / "sticky"
    folder.mkdir()
    target = tmp_path / "target.csv"
    target.write_text("old\n")
    (folder / "link.csv").symlink_to(target)
    os.lchown(folder / "link.csv", 4242, 4242)
    folder.chmod(0o1755)
    with whole_file(folder / "link.csv") as f:
        f.write("new\n")
    assert target.read_text() == "new\n" and (folder / "link.csv").is_symlink()


def test_links_up_to_the_limit_are_followed_and_one_more_is_refused(tmp_path):
    """A chain of MAX_LINKS (40) links is written through; one of 41 is refused by name, as the kernel
    refuses it (r297 M14: 41 followed, then the kernel's own ELOOP without the path's words)."""
    target = tmp_path / "target.csv"
    target.write_text("old\n")
    previous = target
    for i in range(_whole_file.MAX_LINKS + 1):
        link = tmp_path / f"link{i}.csv"
        link.symlink_to(previous.name)
        previous = link
    with whole_file(tmp_path / f"link{_whole_file.MAX_LINKS - 1}.csv") as f:
        f.write("new\n")
    assert target.read_text() == "new\n"
    last = tmp_path / f"link{_whole_file.MAX_LINKS}.csv"
    with pytest.raises(OSError, match=f"cannot write {last}: more than 40 symbolic links"):
        with whole_file(last):
            pytest.fail("no file to write")
