# nestbroker — every entry point a person or CI needs. See README.md.
SHELL := /bin/bash
PREFIX ?= /usr/local
DESTDIR ?=
NODE_MODULES_STAMP := node_modules/.package-lock.json

.PHONY: all deps build typecheck lint test check demo bench e2e install uninstall clean

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
# every test (unit, integration on the real kernel as root).
test: build typecheck lint
	npx jest --runInBand

# Faster edit loop: build and the unit tests only.
check: build
	npx jest --runInBand test/unit

demo: build
	node dist/demo/demo.js

bench: build
	node dist/bench/run-all.js

clean:
	rm -rf dist
