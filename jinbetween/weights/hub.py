"""The Hugging Face hub: the files of an SVD repo that conversion reads, downloaded and nothing else."""

from __future__ import annotations

from pathlib import Path

from jinbetween.errors import WeightsNotFoundError
from jinbetween.weights.loading import COMPONENTS, PIPELINE_CONFIGS, UNET_COMPONENT, Component


def component_patterns(component: Component, variant: str | None, allow_pickle: bool = False) -> list[str]:
    """Hub file patterns of one component's config and weights (single, sharded, and pickled if allowed)."""
    c, suffix = component, f".{variant}" if variant else ""
    patterns = [f"{c.name}/config.json", f"{c.name}/{c.stem}{suffix}.safetensors",
                f"{c.name}/{c.stem}.safetensors.index{suffix}.json", f"{c.name}/{c.stem}{suffix}-*.safetensors"]
    if allow_pickle:
        patterns += [f"{c.name}/{c.stem}{suffix}.bin", f"{c.name}/{c.stem}{suffix}-*.bin"]
    return patterns


def hub_allow_patterns(variant: str | None, allow_pickle: bool = False) -> list[str]:
    """Files of an SVD pipeline repo that conversion reads (nothing else is downloaded)."""
    patterns = list(PIPELINE_CONFIGS.values())
    for c in COMPONENTS:
        patterns += component_patterns(c, variant, allow_pickle)
    return patterns


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], local_option: str) -> Path:
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # the hub client raises many types (network, auth, gated repo, missing revision)
        raise WeightsNotFoundError(
            f"Could not download {repo_id}{'@' + revision if revision else ''} from the Hugging Face hub: {err}\n"
            "SVD repos are gated: accept the licence on the model page, run `huggingface-cli login`, check the "
            f"network, or download the folder yourself and pass {local_option}.") from err


def download_pipeline(repo_id: str, *, revision: str | None = None, variant: str | None = None,
                      allow_pickle: bool = False) -> Path:
    """Downloads the files conversion needs from the Hugging Face hub; returns the local snapshot folder."""
    return _snapshot(repo_id, revision, hub_allow_patterns(variant, allow_pickle), "--local-dir")


def download_unet(repo_id: str, *, revision: str | None = None, variant: str | None = None,
                  allow_pickle: bool = False) -> Path:
    """Downloads only an SVD repo's `unet/` config and weights; returns the snapshot folder (holding `unet/`)."""
    return _snapshot(repo_id, revision, component_patterns(UNET_COMPONENT, variant, allow_pickle),
                     "its path as --gi-base")

