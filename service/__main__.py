"""backdoor-guard [serve | verify | healthcheck | demo]: the service's command line (`python -m service` serves)."""

from __future__ import annotations

import argparse
import logging
import sys
import urllib.error
import urllib.request

from pydantic import ValidationError

from service.settings import Settings


def load_settings() -> Settings:
    """Settings from GUARD_*; a bad value exits with status 2 and names the variable."""
    try:
        return Settings()
    except ValidationError as err:
        problems = "; ".join(
            (f"GUARD_{'_'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "") + e["msg"] for e in err.errors()
        )
        sys.stderr.write(f"backdoor-guard: invalid settings: {problems}\n")
        raise SystemExit(2) from None


def serve(settings: Settings) -> None:
    """Load and check the bundle and the guard the settings ask of it first, so a bad one (or a setting it cannot
    honour, GUARD_STRIP_N on a bundle without STRIP) stops the start with one line (exit 1), then serve."""
    from service.app import create_app, load_bundle
    from service.bundle import BundleError
    from service.runtime import pipeline_for
    from service.server import serve as run_server

    try:
        bundle = load_bundle(settings)
        pipeline_for(settings, bundle)
    except (BundleError, OSError, ValueError) as err:
        sys.stderr.write(f"backdoor-guard: refusing to start: bundle {settings.models_dir}: {err}\n")
        raise SystemExit(1) from None
    run_server(settings, create_app(settings, loader=lambda _: bundle))


def verify(settings: Settings) -> None:
    """Check the bundle as the service will run it: hashes, manifest values, the GUARD_BUNDLE_SHA256 pin,
    sessions, the warm-up batches. Print its root digest; exit 1 with one line if anything fails."""
    from service.app import load_bundle
    from service.bundle import BundleError
    from service.runtime import Runtime, check_warm_up
    from service.selftest import self_test

    try:
        runtime = Runtime.build(settings, load_bundle(settings))  # the service's own loading and pipeline
        for images in runtime.warm_up_batches():
            check_warm_up(runtime.pipeline.run(images))
        tested = ""
        if runtime.guarded:  # the service's self-test too
            test = self_test(runtime.bundle, lambda x: runtime.pipeline.run_in_chunks(x, runtime.chunk_images))
            test.check()
            tested = f"; self-test flagged {test.summary()}"
    except (BundleError, OSError, ValueError) as err:  # ValueError includes the guard's NonFiniteScore
        sys.stderr.write(f"backdoor-guard: bundle {settings.models_dir} failed verification: {err}\n")
        raise SystemExit(1) from None
    bundle = runtime.bundle
    name, files = bundle.manifest["name"], bundle.manifest["files"]
    sys.stdout.write(
        f"bundle {name} in {settings.models_dir}: {len(files)} files verified, ran{tested}; "
        f"root digest (SHA-256 of manifest.json) {bundle.digest}\n"
    )


def healthcheck(settings: Settings, timeout: float = 3.0) -> None:
    """Exit 0 when this host's service answers /v2/health/ready with 200, else 1 (for Docker's HEALTHCHECK)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{settings.port}/v2/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            ok = response.status == 200
    except (urllib.error.URLError, OSError) as err:
        sys.stderr.write(f"{url}: {err}\n")
        ok = False
    raise SystemExit(0 if ok else 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="backdoor-guard",
        description="backdoor-guard inference service. Settings come from GUARD_* environment variables.",
        epilog="Without a command: serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("serve", help="serve on GUARD_HOST:GUARD_PORT (the default command)")
    sub.add_parser("verify", help="verify the bundle in GUARD_MODELS_DIR and run one batch through it")
    sub.add_parser("healthcheck", help="exit 0 if the local service is ready (Docker HEALTHCHECK)")
    demo = sub.add_parser(
        "demo",
        help="keep sending clean and triggered sample images to a running service",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from service.demo_client import add_arguments

    add_arguments(demo)
    scan = sub.add_parser(
        "scan",
        help="run the guard over a folder tree or an .npz (in this process, or through --url) and summarise",
        description="Writes verdicts.csv, summary.json, summary.md and suspicious.png to --out. Exit status 1 when "
        "a file could not be read (listed in the summary; never counted as clean).",
    )
    from service.scan import add_arguments as scan_arguments

    scan_arguments(scan)
    args = parser.parse_args(argv)
    if args.command == "scan":
        from service.scan import run as run_scan

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        summary = run_scan(args, None if args.url else load_settings())
        sys.stdout.write((args.out / "summary.md").read_text())
        raise SystemExit(1 if summary["errors"] else 0)
    if args.command == "demo":
        from service.demo_client import run

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        run(args)
        return
    settings = load_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    {"serve": serve, "verify": verify, "healthcheck": healthcheck}[args.command or "serve"](settings)


if __name__ == "__main__":
    main()
