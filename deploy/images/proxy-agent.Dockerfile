# The proxy-agent image, for machines with a Docker engine (or BuildKit, buildah, podman).
# Build from the repository's root:
#   docker build -f deploy/images/proxy-agent.Dockerfile -t proxy-agent .
# The same root filesystem as deploy/images/build.sh (the daemonless build) makes: a Debian
# root with python3, libnghttp2 and netbase only (mmdebstrap's extract variant: no shell, no
# package manager), our wheel built against that Debian's Python and libnghttp2, the
# entrypoints /proxy-server and /proxy-agent, byte code compiled in advance. Runs as
# nobody (65534); a read-only root filesystem is fine.
ARG DEBIAN_IMAGE=debian:bookworm

FROM ${DEBIAN_IMAGE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      binutils ca-certificates gcc libc6-dev libnghttp2-dev mmdebstrap pkg-config \
      python3-dev python3-venv \
 && python3 -m venv /venv \
 && /venv/bin/pip install -q "setuptools>=77" wheel "Cython>=3.0,<3.3"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY csrc/ csrc/
COPY konnectivity_fast/ konnectivity_fast/
RUN find konnectivity_fast -name '*.so' -delete && rm -f konnectivity_fast/_wire.c \
 && /venv/bin/pip wheel -q --no-deps --no-build-isolation -w /wheels . \
 && /venv/bin/pip download -q --only-binary=:all: -d /wheels "uvloop>=0.19"
# chrootless: the extract variant only unpacks packages, which needs no privileges.
RUN . /etc/os-release \
 && mmdebstrap -q --mode=chrootless --variant=extract \
      --include=python3,libnghttp2-14,netbase "$VERSION_CODENAME" /rootfs
COPY deploy/images/finish-root.sh /finish-root.sh
COPY deploy/images/rootfs/ /rootfs-files/
RUN ROOTFS_FILES=/rootfs-files PIP_PYTHON=/venv/bin/python /finish-root.sh /rootfs /wheels/*.whl

FROM scratch
COPY --from=build /rootfs/ /
ENV KONNECTIVITY_FAST_REQUIRE_COMPILED=1 LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
USER 65534:65534
# Upstream's default ports: health, admin.
EXPOSE 8093 8094
ENTRYPOINT ["/proxy-agent"]
