# nestbroker — every entry point a person or CI needs. See README.md.
SHELL := /bin/bash
PREFIX ?= /usr/local
DESTDIR ?=
NODE_MODULES_STAMP := node_modules/.package-lock.json

.PHONY: all deps build typecheck lint test check demo bench e2e install uninstall clean man deb packaging-deps test-deps schemas

all: build

# `npm ci` only when the lock file changed since the last install.
$(NODE_MODULES_STAMP): package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

deps: $(NODE_MODULES_STAMP)

build: deps
	npx tsc -p tsconfig.build.json

typecheck: deps
	npx tsc -p tsconfig.json --noEmit

lint: deps
	npx eslint .
	npx prettier --check .

# The README's test command: installs what it needs, then type-checks, lints and runs
# every test: unit, integration on the real kernel as root, then the real-guest test
# under QEMU and under libvirt (test/e2e; it installs its Debian packages itself and
# caches the image).
test: build typecheck lint test-deps
	npx jest --runInBand
	npx jest -c jest.e2e.config.js --runInBand

# The JSON Schemas of docs/schemas/, generated from the zod schemas (tools/schemas.ts;
# docs/protocol.md, "JSON Schemas"). A test fails when the checked-in ones are stale.
schemas: build
	node dist/tools/schemas.js docs/schemas

# Faster edit loop: build and the unit tests only.
check: build
	npx jest --runInBand test/unit

demo: build
	node dist/demo/demo.js

# Every benchmark in sequence (docs/performance.md), as root; JSON in bench/results/.
# One alone: `make bench-cascade`, `make bench-footprint`, `make bench-graceful-vs-oom`,
# `make bench-cgroup-ops`, `make bench-planner-scale`, `make bench-libvirt-removal`; options through BENCH_ARGS, e.g.
# `make bench-graceful-vs-oom BENCH_ARGS="--real-guest --runs 3"` (the QEMU guest),
# `make bench-cascade BENCH_ARGS="--sizes 1x100 --runs 50"`.
BENCH_ARGS ?=
bench: build
	node dist/bench/run-all.js

bench-%: build
	@test -f bench/$*.ts || { echo "no benchmark bench/$*.ts" >&2; exit 2; }
	node dist/bench/$*.js $(BENCH_ARGS)

clean:
	rm -rf dist

# Man pages from docs/man/*.md with go-md2man (Debian package go-md2man), and nestctl's
# bash completion from the CLI itself (yargs). Into dist/, which `make install` installs
# from when present.
MAN_PAGES := $(patsubst docs/man/%.md,dist/man/%,$(wildcard docs/man/*.md))
man: $(MAN_PAGES) dist/bash-completion/nestctl

dist/man/%: docs/man/%.md
	@command -v go-md2man >/dev/null || { echo "make man: go-md2man is missing: apt-get install go-md2man" >&2; exit 1; }
	@mkdir -p dist/man
	go-md2man -in $< -out $@

dist/bash-completion/nestctl: build
	@mkdir -p dist/bash-completion
	node dist/agent/cli/nestctl.js completion >$@

# What test/integration/packaging/deb.test.ts needs to build and check the .deb: Debian's
# packages, installed with apt-get when missing.
PACKAGING_DEBS := debhelper go-md2man lintian dpkg-dev
# What the other tests need from Debian: libfaketime (test/integration/guest/wall-step.test.ts
# steps a guest agent's wall clock without touching the machine's).
TEST_DEBS := libfaketime
packaging-deps:
	@missing=$$(for p in $(PACKAGING_DEBS) $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi

# Every Debian package the tests need: the packaging ones above, and the real libvirtd that
# test/integration/host/libvirt.test.ts drives (it starts virtlogd and libvirtd itself when
# they are not running, and stops what it started; docs/libvirt.md, "Tests") with
# virt-xml-validate for the docs' domain XML. No recommends: no systemd pulled in.
LIBVIRT_DEBS := libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libxml2-utils qemu-system-x86
test-deps: packaging-deps
	@missing=$$(for p in $(LIBVIRT_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

# ---- the Debian package (debian/; docs/install.md) -------------------------------------
# dist/nestbroker_<version>_all.deb, built by dpkg-buildpackage (debhelper) in a copy of
# the tree under dist/deb/ (the .deb lands beside its source directory, so not in the
# parent of this tree). node_modules is hard-linked in; `make install` takes only the
# production dependencies from it. Build dependencies: apt-get install debhelper go-md2man.
VERSION := $(shell dpkg-parsechangelog -l debian/changelog -SVersion 2>/dev/null)
DEB := dist/nestbroker_$(VERSION)_all.deb
deb: $(DEB)
$(DEB): deps $(shell git ls-files -co --exclude-standard 2>/dev/null)
	@command -v dh >/dev/null || { echo "make deb: debhelper is missing: apt-get install debhelper go-md2man" >&2; exit 1; }
	rm -rf dist/deb && mkdir -p dist/deb/nestbroker-$(VERSION)
	git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C dist/deb/nestbroker-$(VERSION)
	cp -al node_modules dist/deb/nestbroker-$(VERSION)/node_modules
	cd dist/deb/nestbroker-$(VERSION) && dpkg-buildpackage -b -us -uc
	cp dist/deb/nestbroker_$(VERSION)_all.deb $@

# ---- installation (docs/install.md) ----------------------------------------------------
# `make build && make install` as root. Honours DESTDIR (staging, packaging) and PREFIX.
# Installs only what exists already: it never builds, so it also works from a read-only
# tree (the real-guest test runs it from a 9p share inside the guest).
LIBDIR := $(PREFIX)/lib/nestbroker
BINDIR := $(PREFIX)/bin
DOCDIR := $(PREFIX)/share/doc/nestbroker
MANDIR := $(PREFIX)/share/man
COMPLETIONDIR := $(PREFIX)/share/bash-completion/completions
UNITDIR ?= /lib/systemd/system
UDEVRULESDIR ?= /lib/udev/rules.d
CONFDIR ?= /etc/nestbroker
# The node the wrappers exec, resolved now (systemd's PATH need not contain it).
NODE ?= $(shell command -v node 2>/dev/null || echo /usr/bin/node)
# Node flags of the `nestbroker` wrapper, which the units' ExecStart runs
# (docs/performance.md): 2 MiB semi-spaces instead of V8's 16 MiB keep an idle guest agent
# with 200 projects near 68 MiB RSS, not 100 (bench/footprint), the cascade no slower.
# Flags, not NODE_OPTIONS: the environment would reach the projects the guest agent starts.
# demo/stack.ts AGENT_NODE_FLAGS. Measured and not made the default (docs/performance.md,
# "Footprint: what each step saved"): --lite-mode (-17 MiB a guest agent, the cascade
# 1.5x slower), --no-opt (-8 MiB, 1.4x slower); --optimize-for-size, --single-threaded,
# --max-old-space-size and --max-lazy saved nothing beyond the noise.
NODE_DAEMON_FLAGS ?= --max-semi-space-size=2
INSTALLED_UNITS := nestbroker-guest.service nestbroker-host.service
UDEV_RULE := 99-nestbroker.rules
# Prints the lock file's top-level packages that are not dev-only and are present.
PROD_MODULES_JS := const fs = require("fs"); const l = JSON.parse(fs.readFileSync("package-lock.json", "utf8")); for (const [p, m] of Object.entries(l.packages)) if (p && !m.dev && p.split("node_modules/").length === 2 && fs.existsSync(p)) console.log(p);

install:
	@test -f dist/agent/cli/nestbroker.js || { echo "make install: dist/agent/cli/nestbroker.js is missing: run 'make build' first" >&2; exit 1; }
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(DOCDIR) \
	  $(DESTDIR)$(UNITDIR) $(DESTDIR)$(UDEVRULESDIR) $(DESTDIR)$(CONFDIR)
	rm -rf $(DESTDIR)$(LIBDIR)/dist $(DESTDIR)$(LIBDIR)/node_modules
	install -d $(DESTDIR)$(LIBDIR)/dist
	cp -a dist/agent dist/cgroup-adapter $(DESTDIR)$(LIBDIR)/dist/
	install -m 0644 package.json $(DESTDIR)$(LIBDIR)/package.json
	@# Production dependencies only, read from the lock file (no npm needed: the guest has
	@# node alone). Top-level packages not marked "dev"; nested ones come with their parent.
	set -o pipefail; $(NODE) -e '$(PROD_MODULES_JS)' | xargs -r cp -a --parents -t $(DESTDIR)$(LIBDIR)/
	test -d $(DESTDIR)$(LIBDIR)/node_modules || { echo "make install: no production node_modules found: run 'make deps'" >&2; exit 1; }
	printf '#!/bin/sh\nexec %s %s %s/dist/agent/cli/nestbroker.js "$$@"\n' '$(NODE)' '$(NODE_DAEMON_FLAGS)' '$(LIBDIR)' >$(DESTDIR)$(BINDIR)/nestbroker
	printf '#!/bin/sh\nexec %s %s/dist/agent/cli/nestctl.js "$$@"\n' '$(NODE)' '$(LIBDIR)' >$(DESTDIR)$(BINDIR)/nestctl
	chmod 0755 $(DESTDIR)$(BINDIR)/nestbroker $(DESTDIR)$(BINDIR)/nestctl
	install -D -m 0755 systemd/nestbroker-guest-release $(DESTDIR)$(LIBDIR)/libexec/nestbroker-guest-release
	@# The units name /usr/local paths; rewrite them for another PREFIX.
	for u in $(INSTALLED_UNITS); do \
	  sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/usr/local/lib/nestbroker/|$(LIBDIR)/|g' -e 's|/usr/local/share/doc/|$(PREFIX)/share/doc/|g' \
	    systemd/$$u >$(DESTDIR)$(UNITDIR)/$$u && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u; done
	install -m 0644 systemd/$(UDEV_RULE) $(DESTDIR)$(UDEVRULESDIR)/$(UDEV_RULE)
	for f in guest host; do \
	  if [ -f examples/$$f.yaml ]; then install -m 0644 examples/$$f.yaml $(DESTDIR)$(CONFDIR)/$$f.yaml.example; fi; done
	for d in install errors; do \
	  if [ -f docs/$$d.md ]; then install -m 0644 docs/$$d.md $(DESTDIR)$(DOCDIR)/$$d.md; fi; done
	@# The libvirt walk-through, its domain XML and host.yaml (docs/libvirt.md): documents,
	@# not configs (everything under /etc/nestbroker is a conffile of the package).
	if [ -f docs/libvirt.md ]; then install -m 0644 docs/libvirt.md $(DESTDIR)$(DOCDIR)/libvirt.md; \
	  install -D -m 0644 docs/libvirt/domain.xml $(DESTDIR)$(DOCDIR)/libvirt/domain.xml; \
	  install -D -m 0644 examples/host-libvirt.yaml $(DESTDIR)$(DOCDIR)/examples/host-libvirt.yaml; fi
	@# Man pages and completion, when `make man` made them.
	for m in dist/man/*.[0-9]; do [ -f "$$m" ] || continue; \
	  install -D -m 0644 "$$m" $(DESTDIR)$(MANDIR)/man$${m##*.}/$${m##*/}; done
	if [ -f dist/bash-completion/nestctl ]; then \
	  install -D -m 0644 dist/bash-completion/nestctl $(DESTDIR)$(COMPLETIONDIR)/nestctl; fi
	@# Live system (no DESTDIR, systemd running): make the new units and rule known.
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; \
	  command -v udevadm >/dev/null && udevadm control --reload || true; fi

# Removes what `install` put in place. Keeps /etc/nestbroker/*.yaml (your configs) and
# /var/lib/nestbroker (journals). Stops and disables the services first on a live system:
# projects of the guest agent keep running (KillMode=process) until you stop them.
uninstall:
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  systemctl disable --now $(INSTALLED_UNITS) 2>/dev/null || true; fi
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(DOCDIR)
	rm -f $(DESTDIR)$(BINDIR)/nestbroker $(DESTDIR)$(BINDIR)/nestctl
	rm -f $(DESTDIR)$(MANDIR)/man1/nestctl.1 $(DESTDIR)$(MANDIR)/man8/nestbroker.8 $(DESTDIR)$(COMPLETIONDIR)/nestctl
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(INSTALLED_UNITS)) $(DESTDIR)$(UDEVRULESDIR)/$(UDEV_RULE)
	rm -f $(DESTDIR)$(CONFDIR)/guest.yaml.example $(DESTDIR)$(CONFDIR)/host.yaml.example
	rmdir $(DESTDIR)$(CONFDIR) 2>/dev/null || true
	if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

# The real-guest tests alone (test/e2e): build or reuse the cached Debian guest image,
# boot it under QEMU (guest.e2e.test.ts), then under the machine's libvirtd as the domain
# of docs/libvirt/nbguest-tcg.xml (libvirt.e2e.test.ts), and install the .deb in it.
# Logs: test/e2e/out/ and test/e2e/out/libvirt/.
e2e: build
	npx jest -c jest.e2e.config.js --runInBand
