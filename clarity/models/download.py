"""`clarity weights download`: the recommended weights from the Hugging Face hub, checked and in place.

The plan (which repository, which files, where each lands under the weights root) is computed
from the hub's file listing, so it only fetches what loading needs: configs, the tokenizer,
and one safetensors file per part (the fp16 copy where the repository has one; it is stored
under the plain name, which the loader reads, and upcast on the CPU). Files download into
`<root>/.cache/huggingface` from the commit that was listed, with huggingface_hub (progress
bars, interrupted downloads resume); each is checked against the hub's checksum (sha256 for
large files, the git blob hash for small ones), then hard-linked (or copied) into place. A
file already in place with the right checksum is not fetched again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from clarity.errors import WeightsError
from clarity.models.catalogue import DEFAULT_MODEL_ID

#: Seconds to wait for the hub's file listing before calling it unreachable.
HUB_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Component:
    """One part of the recommended set: where it comes from on the hub and where it goes."""

    #: What it is, as users know it.
    name: str
    repo_id: str
    #: A branch, or a commit where the repository's history is known to us.
    revision: str
    #: Where it lands, relative to the weights root.
    target: str
    #: Repository folders to take (configs, tokenizer files, one weights file each); "" is the top.
    folders: tuple[str, ...] = ()
    #: Exact files to take instead, for single-file components.
    files: tuple[str, ...] = ()


#: The default set: everything a model needs.
RECOMMENDED: tuple[Component, ...] = (
    # The original's VAE replaces the base's own (vae/ below), so the base's vae/ is not fetched;
    # nor its safety checker (see SAFETY_CHECKER).
    Component("SD1.5 base model", "stable-diffusion-v1-5/stable-diffusion-v1-5", "main",
              f"models/{DEFAULT_MODEL_ID}", folders=("unet", "text_encoder", "tokenizer", "scheduler")),
    Component("ControlNet tile", "lllyasviel/control_v11f1e_sd15_tile", "main", "controlnet", folders=("",)),
    Component("VAE sd-vae-ft-mse", "stabilityai/sd-vae-ft-mse", "main", "vae", folders=("",)),
)
#: `--extras`: what the original Clarity adds, from its author's hub repositories (pinned commits).
EXTRAS: tuple[Component, ...] = (
    Component("ESRGAN 4x-UltraSharp pre-upscaler", "philz1337x/upscaler", "011deacac8270114eb7d2eeff4fe6fa9a837be70",
              "upscalers", files=("4x-UltraSharp.pth",)),
    Component("more_details LoRA", "philz1337x/loras", "a3802c0280c0d00c2ab18d37454a8744c44e474e",
              "loras", files=("more_details.safetensors",)),
)
#: `--safety-checker`: the SD safety checker with its image preprocessor config, in one folder.
SAFETY_CHECKER = Component("safety checker", "CompVis/stable-diffusion-safety-checker", "main", "safety_checker",
                           folders=("",))

#: Files of a repository folder that loading needs besides the weights.
CONFIG_SUFFIXES = (".json", ".txt")
#: Pickled weight formats: skipped in folders, where the loaders read the safetensors copy.
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
#: The half-precision copy's infix in diffusers/transformers repositories.
FP16_INFIX = ".fp16"


class HubUnreachable(ConnectionError):
    """The hub cannot be reached (offline mode or no network); the message says what to copy where."""


class ChecksumError(OSError):
    """A downloaded file does not match the hub's checksum; it has been deleted."""


@dataclass(frozen=True)
class HubFile:
    """A file of a repository as the hub lists it."""

    path: str
    size: int
    #: The sha256 of its content for LFS files, else None.
    sha256: str | None
    #: The git blob hash (sha1 of "blob <size>\\0" + content).
    blob_id: str | None


@dataclass(frozen=True)
class RepoListing:
    """A repository's files at one commit, as the hub lists them."""

    #: The commit the listing is of; every file is then fetched from it, so that the files and
    #: checksums stay consistent even if the branch moves during the download.
    commit: str
    files: list[HubFile]


@dataclass(frozen=True)
class PlannedFile:
    """One download: `filename` of `repo_id` at commit `revision`, stored at `target`."""

    component: str
    repo_id: str
    revision: str
    filename: str
    target: Path
    size: int
    sha256: str | None
    blob_id: str | None


def components(extras: bool = False, safety_checker: bool = False) -> list[Component]:
    """The components to fetch: the recommended set, plus the extras and the safety checker if asked."""
    return [*RECOMMENDED, *(EXTRAS if extras else ()), *((SAFETY_CHECKER,) if safety_checker else ())]


def select_files(component: Component, listing: Iterable[HubFile]) -> list[tuple[HubFile, str]]:
    """The files of `component` to fetch from a repository `listing`, each with its path under the target.

    Per folder: every config (`.json`, `.txt`) and one safetensors weights file, the fp16 copy
    where there is one (stored under the plain name the loader reads). `.bin`, `.ckpt`,
    non-EMA and other formats are skipped. Raises `FileNotFoundError` for what is missing.
    """
    files = {f.path: f for f in listing}
    if component.files:
        missing = [name for name in component.files if name not in files]
        if missing:
            raise FileNotFoundError(f"{component.repo_id} has no {', '.join(missing)}")
        return [(files[name], PurePosixPath(name).name) for name in component.files]
    chosen: list[tuple[HubFile, str]] = []
    for folder in component.folders:
        inside = {PurePosixPath(path).relative_to(folder).as_posix() if folder else path: f
                  for path, f in files.items() if str(PurePosixPath(path).parent) == (folder or ".")}
        configs = [(f, name) for name, f in inside.items() if name.endswith(CONFIG_SUFFIXES)]
        weights = [name for name in inside if name.endswith(".safetensors") and "non_ema" not in name]
        halves = {name.replace(FP16_INFIX, ""): name for name in weights if FP16_INFIX in name}
        stored = sorted({name.replace(FP16_INFIX, "") for name in weights})
        if not configs and not stored:
            raise FileNotFoundError(f"{component.repo_id} has no folder {folder!r}")
        if not stored and any(name.endswith(PICKLE_SUFFIXES) for name in inside):
            # Pickles can run code when loaded, and the loaders read safetensors only.
            raise FileNotFoundError(f"{component.repo_id}/{folder} has pickle weights only, no .safetensors")
        prefix = f"{folder}/" if folder else ""
        chosen += [(f, prefix + name) for f, name in configs]
        chosen += [(inside[halves.get(name, name)], prefix + name) for name in stored]
    return chosen


def plan(root: str | Path, wanted: Iterable[Component], list_files: Callable[[Component], RepoListing]
         ) -> list[PlannedFile]:
    """Every file to fetch for `wanted` into `root`, from `list_files(component)` (the hub's listing)."""
    root = Path(root)
    planned = []
    for component in wanted:
        listing = list_files(component)
        for hub_file, relative in select_files(component, listing.files):
            planned.append(PlannedFile(component.name, component.repo_id, listing.commit, hub_file.path,
                                       root / component.target / relative, hub_file.size, hub_file.sha256,
                                       hub_file.blob_id))
    return planned


def hub_listing(component: Component) -> RepoListing:
    """The hub's listing of `component`'s repository, with sizes and checksums; `HubUnreachable` if offline."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubUnreachable("offline mode is enabled (HF_HUB_OFFLINE=1)")
    try:
        info = HfApi().model_info(component.repo_id, revision=component.revision, files_metadata=True,
                                  timeout=HUB_TIMEOUT_SECONDS)
    except _network_errors() as error:
        raise HubUnreachable(f"cannot reach {constants.ENDPOINT}: {error}") from error
    files = [HubFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None, s.blob_id)
             for s in info.siblings or []]
    return RepoListing(info.sha or component.revision, files)


def _network_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub raises its HTTP client's transport errors as they are (httpx2 in 2.x,
    # httpx in 1.x); OfflineModeIsEnabled is a ConnectionError; a download that cannot reach
    # the hub and has no cached copy is a LocalEntryNotFoundError.
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        import httpx2 as http_client
    except ImportError:
        import httpx as http_client
    return (ConnectionError, TimeoutError, http_client.TransportError, LocalEntryNotFoundError)


def file_matches(path: Path, size: int, sha256: str | None, blob_id: str | None) -> bool:
    """Whether `path` has the hub's size and checksum (sha256 for LFS files, else the git blob hash)."""
    if not path.is_file() or path.stat().st_size != size:
        return False
    digest = hashlib.sha256() if sha256 else hashlib.sha1()
    if not sha256:
        digest.update(f"blob {size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest() == (sha256 or blob_id)


def fetch(planned: PlannedFile, cache_dir: Path) -> str:
    """Download one planned file (resuming a partial one), check it, and put it in place; say what was done."""
    from huggingface_hub import hf_hub_download

    if file_matches(planned.target, planned.size, planned.sha256, planned.blob_id):
        return "already in place, checksum ok"
    cached = Path(hf_hub_download(planned.repo_id, planned.filename, revision=planned.revision,
                                  cache_dir=cache_dir))
    blob = cached.resolve()
    if not file_matches(blob, planned.size, planned.sha256, planned.blob_id):
        blob.unlink(missing_ok=True)
        cached.unlink(missing_ok=True)
        raise ChecksumError(f"{planned.repo_id}/{planned.filename} does not match the hub's checksum"
                            f" ({planned.sha256 or planned.blob_id}); it was deleted: run the download again")
    planned.target.parent.mkdir(parents=True, exist_ok=True)
    partial = planned.target.with_name(planned.target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(blob, partial)  # no second copy on disk when the cache is on the same filesystem
    except OSError:
        shutil.copyfile(blob, partial)
    os.replace(partial, planned.target)
    return "downloaded, checksum ok"


def offline_instructions(root: str | Path, wanted: Iterable[Component]) -> str:
    """What to download elsewhere and copy where, for a machine that cannot reach the hub."""
    root = Path(root)
    lines = [f"On a machine with access, run `clarity weights download --weights DIR` and copy DIR to {root},"
             " or fetch these from huggingface.co yourself:"]
    for component in wanted:
        what = (", ".join(component.files) if component.files else
                " ".join(f"{folder}/" if folder else "config.json and the .safetensors weights"
                         for folder in component.folders))
        lines.append(f"  {root / component.target}/  <-  {component.repo_id}: {what}  ({component.name})")
    lines.append("Diffusers folders keep their layout (unet/config.json, unet/diffusion_pytorch_model.safetensors,"
                 " ...); a *.fp16.safetensors file goes in without `.fp16`. See weights/README.md.")
    return "\n".join(lines)


def download(
    root: str | Path,
    wanted: Iterable[Component],
    list_files: Callable[[Component], RepoListing] = hub_listing,
    fetch_file: Callable[[PlannedFile, Path], str] = fetch,
    out: Any = sys.stdout,
) -> list[PlannedFile]:
    """Fetch `wanted` into the weights root `root`; `HubUnreachable` (with `offline_instructions`) when offline."""
    root = Path(root)
    if (root / "unet").is_dir():
        # Files put in a model folder would never be found: it is read as that one model.

        raise WeightsError(f"{root} is a model folder, not a weights root; download into another folder")
    wanted = list(wanted)
    try:
        planned = plan(root, wanted, list_files)
    except HubUnreachable as error:
        raise HubUnreachable(f"cannot download weights: {error}.\n{offline_instructions(root, wanted)}") from error
    total = sum(p.size for p in planned)
    print(f"{len(planned)} files, {total / 1e9:.2f} GB, into {root}", file=out)
    cache_dir = root / ".cache" / "huggingface"
    for item in planned:
        try:
            status = fetch_file(item, cache_dir)
        except _network_errors() as error:
            raise HubUnreachable(f"the connection was lost while fetching {item.repo_id}/{item.filename}"
                                 f" ({error}); run the download again to resume") from error
        print(f"{item.target.relative_to(root)}: {status}", file=out)
    return planned
