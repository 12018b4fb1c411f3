"""python -m service (or `backdoor-guard serve`): start the guard on GUARD_HOST:GUARD_PORT."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError


def serve() -> None:
    import uvicorn

    from service.app import create_app
    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as err:
        problems = "; ".join(
            (f"GUARD_{'_'.join(map(str, e['loc'])).upper()}: " if e["loc"] else "") + e["msg"] for e in err.errors()
        )
        sys.stderr.write(f"backdoor-guard: invalid settings: {problems}\n")
        raise SystemExit(2) from None
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        loop="auto",  # uvloop and httptools when installed (the serve extra brings them)
        http="auto",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="backdoor-guard", description="backdoor-guard inference service")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve"], help="what to do")
    parser.parse_args(argv)
    serve()


if __name__ == "__main__":
    main()
