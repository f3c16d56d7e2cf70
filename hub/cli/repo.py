"""`sre-hub init | publish | release | timestamp | keys rotate | serve | bundle export`."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from sre_core.cli import JsonOpt, PortOpt, emit_json, out_console
from sre_core.errors import InputError

__all__ = ["parse_duration", "register"]

RepoOpt = Annotated[Path, typer.Option("--repo", help="Repository directory (created by `sre-hub init`).")]
ChannelOpt = Annotated[str, typer.Option("--channel", help="Release channel, e.g. stable.")]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``12h``, ``14d``, ``2w`` -> timedelta. Raises InputError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise InputError(
            f"duration {text!r}", "expected a positive number with a unit s, m, h, d or w", "e.g. 14d"
        )
    return timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])


def _print(info: dict[str, Any], json_out: bool, line: str) -> None:
    if json_out:
        emit_json(info)
    else:
        out_console().print(line)


def register(app: typer.Typer) -> None:
    keys_app = typer.Typer(help="Signing keys of the repository's roles.", no_args_is_help=True)
    bundle_app = typer.Typer(help="Offline bundles (sneakernet).", no_args_is_help=True)
    app.add_typer(keys_app, name="keys")
    app.add_typer(bundle_app, name="bundle")

    @app.command()
    def init(
        repo: RepoOpt,
        channel: Annotated[
            list[str] | None,
            typer.Option("--channel", help="Channel to create (repeatable; default stable)."),
        ] = None,
        root_threshold: Annotated[
            int, typer.Option("--root-threshold", help="Root signatures required.")
        ] = 1,
        root_keys: Annotated[int, typer.Option("--root-keys", help="Number of root keys to create.")] = 1,
        json_out: JsonOpt = False,
    ) -> None:
        """Create a TUF repository: root, targets, snapshot, timestamp and one delegated role per channel.

        Development keys are written to REPO/keys; see docs/release-engineering.md for keeping the root
        key offline. Pin REPO/metadata/1.root.json on devices with `sre-agent init --root`.
        """
        from hub.repository import HubRepository

        r = HubRepository.init(repo, root_threshold, max(root_keys, root_threshold), channel or ["stable"])
        info = {"repo": str(r.dir), "channels": r.channels, "root": str(r.metadata_dir / "1.root.json")}
        _print(
            info,
            json_out,
            f"repository {r.dir} with channels {', '.join(r.channels)}; trust anchor {info['root']}",
        )

    @app.command()
    def publish(
        repo: RepoOpt,
        channel: ChannelOpt,
        module: Annotated[str, typer.Option("--module", help="Module name.")],
        version: Annotated[str, typer.Option("--version", help="Module version.")],
        file: Annotated[Path, typer.Argument(help="The artifact file.")],
        manifest: Annotated[
            Path | None,
            typer.Option("--manifest", help="Module manifest (YAML/JSON); name/version come from flags."),
        ] = None,
        kind: Annotated[str | None, typer.Option("--kind", help="model | config | policy")] = None,
        cosign_key: Annotated[
            Path | None, typer.Option("--cosign-key", help="PEM ECDSA P-256 key: attach a cosign signature.")
        ] = None,
        attest: Annotated[
            Path | None, typer.Option("--attest", help="Predicate file (SBOM or provenance JSON) to attest.")
        ] = None,
        predicate_type: Annotated[
            str, typer.Option("--predicate-type", help="in-toto predicate type of --attest.")
        ] = "https://cyclonedx.org/bom",
        attest_key: Annotated[
            Path | None, typer.Option("--attest-key", help="PEM key signing --attest.")
        ] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Add FILE as a target of the channel, with the module manifest in its signed `custom` field.

        A model is loaded by the runtime it declares (ONNX Runtime) and matched against the manifest's
        inputs/outputs before it is signed; a published version is immutable (other bytes are refused).
        """
        import yaml
        from pydantic import ValidationError

        from deployment.manifest import ModuleManifest
        from hub.repository import HubRepository

        data: dict[str, Any] = {}
        if manifest is not None:
            try:
                data = yaml.safe_load(manifest.read_text()) or {}
            except (OSError, yaml.YAMLError) as exc:
                raise InputError(
                    f"read manifest {manifest}", str(exc), "pass a YAML or JSON manifest"
                ) from exc
        data.update({"name": module, "version": version})
        if kind:
            data["kind"] = kind
        data.setdefault("filename", file.name)
        try:
            man = ModuleManifest.model_validate(data)
        except ValidationError as exc:
            from sre_core.cli import describe_validation

            raise InputError(
                f"manifest of {module} {version}",
                describe_validation(exc),
                "fix the value (name/version come from --module/--version, the rest from --manifest)",
            ) from exc
        attestation = None
        if attest is not None:
            if attest_key is None:
                raise InputError("publish --attest", "--attest-key is required with --attest")
            try:
                predicate = json.loads(attest.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"read predicate {attest}", str(exc), "pass a JSON document") from exc
            attestation = (predicate_type, predicate, attest_key.read_bytes())
        r = HubRepository(repo)
        pub = r.publish(
            channel,
            file,
            man,
            cosign_key=cosign_key.read_bytes() if cosign_key else None,
            attestation=attestation,
        )
        info = {
            "target": pub.target,
            "sha256": pub.sha256,
            "length": pub.length,
            "extra_targets": pub.extra_targets,
        }
        _print(info, json_out, f"published {pub.target} ({pub.length} bytes, sha256 {pub.sha256[:16]}...)")

    @app.command()
    def release(
        repo: RepoOpt,
        channel: ChannelOpt,
        module: Annotated[str, typer.Option("--module", help="Module name.")],
        version: Annotated[str, typer.Option("--version", help="Published version to make desired.")],
        expires: Annotated[str, typer.Option("--expires", help="Desired-state lifetime, e.g. 14d.")] = "14d",
        json_out: JsonOpt = False,
    ) -> None:
        """Make MODULE at VERSION the channel's signed desired state (new serial, its own expiry)."""
        from hub.repository import HubRepository

        ds = HubRepository(repo).release(channel, module, version, parse_duration(expires))
        info = json.loads(ds.model_dump_json())
        _print(
            info,
            json_out,
            f"{channel}: desired state serial {ds.serial}, {module} {version}, "
            f"expires {ds.expires.isoformat()}",
        )

    @app.command()
    def timestamp(
        repo: RepoOpt,
        expires: Annotated[
            str | None, typer.Option("--expires", help="Lifetime, e.g. 1d (default from repo).")
        ] = None,
        json_out: JsonOpt = False,
    ) -> None:
        """Re-sign the timestamp role (run from cron well inside its expiry)."""
        from hub.repository import HubRepository

        r = HubRepository(repo)
        v = r.timestamp(parse_duration(expires) if expires else None)
        soon = {k: d.isoformat() for k, d in r.expiring(timedelta(days=30)).items() if k != "timestamp"}
        line = f"timestamp version {v}"
        if soon:
            line += "\n[yellow]re-sign soon (expiring within 30 days):[/yellow] " + ", ".join(
                f"{k} {d}" for k, d in soon.items()
            )
        _print({"timestamp_version": v, "expiring_within_30d": soon}, json_out, line)

    @keys_app.command("rotate")
    def keys_rotate(
        role: Annotated[str, typer.Argument(help="root, targets, snapshot, timestamp or a channel name.")],
        repo: RepoOpt,
        json_out: JsonOpt = False,
    ) -> None:
        """Replace a role's keys; old private keys move to keys/retired/."""
        from hub.repository import HubRepository

        ids = HubRepository(repo).rotate_key(role)
        _print(
            {"role": role, "keyids": ids}, json_out, f"{role}: new key(s) {', '.join(i[:12] for i in ids)}"
        )

    @app.command()
    def serve(
        repo: RepoOpt,
        host: Annotated[str, typer.Option("--host", help="Listen address.")] = "127.0.0.1",
        port: PortOpt = 8080,
        static_only: Annotated[
            bool,
            typer.Option(
                "--static-only",
                help="Only the signed files (/metadata, /targets) with cache headers: a CDN/mirror "
                "origin; no API, no database.",
            ),
        ] = False,
        json_out: JsonOpt = False,
    ) -> None:
        """Serve the repository over HTTP (strong ETags, conditional requests, Range) until interrupted.

        Binds the port before it says it serves. Exit 0 when stopped by Ctrl-C/SIGTERM, 1 when the port is
        in use or needs privileges, 2 for a bad port, address or repository.
        """
        from hub.server import build_hub_app, build_static_app
        from sre_core.http_server import bind_tcp, serve_forever
        from sre_core.malloc import limit_arenas

        # Concurrent ingest decodes in many threads; per-thread malloc arenas each keep their freed decode
        # buffers, multiplying the decode budget in RSS (see sre_core.malloc).
        limit_arenas()
        if not (repo / "repo.json").is_file():
            raise InputError(f"serve {repo}", "not a repository", "run `sre-hub init --repo DIR` first")
        from hub.fleet_api import fleet_routes
        from hub.ingest import ingest_routes
        from sre_core.cli import err_console

        sock = bind_tcp(host, port)  # first: a bad or busy port fails before anything else starts
        if static_only:
            asgi = build_static_app(repo)
        else:
            from hub.approvals_api import approval_routes
            from hub.sites import site_routes

            routes = [
                *ingest_routes(repo / "fleet"),
                *fleet_routes(repo),
                *site_routes(repo),
                *approval_routes(repo),
            ]
            asgi = build_hub_app(repo, extra_routes=routes)
        url = f"http://{host}:{sock.getsockname()[1]}"
        if json_out:
            emit_json({"url": url, "repo": str(repo), "static_only": static_only})
        else:
            what = "the signed files of " if static_only else ""
            err_console().print(f"serving {what}{repo} on {url} (Ctrl-C stops)")
        serve_forever(asgi, sock)

    @bundle_app.command("export")
    def bundle_export(
        repo: RepoOpt,
        channel: ChannelOpt,
        out: Annotated[Path, typer.Argument(help="New directory to write the bundle into.")],
        json_out: JsonOpt = False,
    ) -> None:
        """Write metadata + the channel's targets for `sre-agent pull --from DIR`."""
        from hub.bundle import export_bundle
        from hub.repository import HubRepository

        info = export_bundle(HubRepository(repo), channel, out)
        _print(info, json_out, f"bundle {out}: {info['targets']} targets, {info['target_bytes']} bytes")

    @bundle_app.command("seed")
    def bundle_seed(
        bundle: Annotated[Path, typer.Argument(help="The bundle directory (sre-hub bundle export).")],
        state: Annotated[Path, typer.Option("--state", help="The regional hub's state directory.")],
        root: Annotated[Path, typer.Option("--root", help="The pinned trust anchor: the root's root.json.")],
        upstream: Annotated[str, typer.Option("--upstream", help="The root hub's URL (as for regional).")],
        site: Annotated[str, typer.Option("--site", help="This site's name at the root hub.")] = "site",
        json_out: JsonOpt = False,
    ) -> None:
        """Seed a regional hub from a bundle (verified against --root before it is served); run it while
        that regional hub is stopped. Exit 1 when the bundle is refused, 2 when it is not a bundle."""
        from hub.bundle import seed_regional
        from hub.regional import RegionalConfig, RegionalHub

        rh = RegionalHub(RegionalConfig(upstream=upstream, root=root, state=state, site=site))
        try:
            result = seed_regional(rh, bundle).to_dict()
        finally:
            rh.close()
        _print(
            result,
            json_out,
            f"seeded {state} from {bundle}: timestamp v{result['timestamp_version']}, "
            f"{len(result['fetched'])} targets, {len(result['failed'])} refused",
        )
