# egressd. `make test` needs root for the end-to-end tests (network
# namespaces, nftables); without root they are skipped, except under CI=true.
GO          ?= go
VERSION     ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -s -w -X main.version=$(VERSION)
PREFIX      ?= /usr/local
DESTDIR     ?=
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2
NFPM        := github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2
GOARCH      ?= $(shell $(GO) env GOARCH)
DEB_VERSION ?= $(shell git describe --tags 2>/dev/null | sed 's/^v//' || true)

IMAGE       ?= egressd:dev

.PHONY: build demo test check test-kernels unit lint bench chaos chaos-short install deb image clean

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o egressd ./cmd/egressd

# egressd on its embedded default config in a throw-away sandbox; root.
demo:
	bash demo/run.sh

# The whole suite: everything of check, the fault scenarios with a short
# soak, and the kernel matrix; root.
test: check chaos-short test-kernels

# Lint (vet, staticcheck), unit tests, fuzz seeds and end-to-end tests in
# namespaces, on this machine's kernel; each Go benchmark once, so that
# their own checks cannot rot between `make bench` runs.
check: lint
	$(GO) test -count=1 -race -timeout 30m ./...
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 1x ./...
	cd deploy/kubernetes && $(GO) vet ./... && $(GO) test -count=1 ./...
	cd deploy/image && $(GO) vet ./... && $(GO) test -count=1 ./...

# The kernel-dependent end-to-end tests inside Debian's 5.10, 6.1 and 6.12
# kernels in qemu (test/kernels/run.sh); root. KERNELS="5.10 6.1 6.12",
# KERNEL_TESTS=<go test -run regex>.
test-kernels:
	KERNELS='$(value KERNELS)' KERNEL_TESTS='$(value KERNEL_TESTS)' bash test/kernels/run.sh

# Unit tests only (no root needed).
unit:
	$(GO) test -count=1 -race $$($(GO) list ./... | grep -v /test)

# DNS load benchmark (direct vs dnsmasq vs egressd) and Go benchmarks; root.
bench:
	bash bench/run.sh

# Fault scenarios in the namespace lab (noisy neighbour, upstream loss,
# delay, black hole, SERVFAIL, junk, truncation, spoofing, kill -9, soak);
# root. Prints a table and writes it to test/chaos/results.md.
# CHAOS_SOAK sets the soak (30m for the full run).
CHAOS_SOAK ?= 30m
chaos:
	CHAOS_SOAK=$(CHAOS_SOAK) CHAOS_RESULTS=$(CURDIR)/test/chaos/results.md \
		$(GO) test -tags chaos -count=1 -v -timeout 120m -run '^TestChaos$$' ./test

# The same with a 60 s soak, results printed only (CI).
chaos-short:
	CHAOS_SOAK=60s $(GO) test -tags chaos -count=1 -v -timeout 20m -run '^TestChaos$$' ./test

lint:
	@out=$$($$($(GO) env GOROOT)/bin/gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

install: build
	install -D -m 0755 egressd $(DESTDIR)$(PREFIX)/bin/egressd
	install -D -m 0644 systemd/egressd.service $(DESTDIR)/etc/systemd/system/egressd.service
	install -D -m 0644 systemd/egressd-apply.service $(DESTDIR)/etc/systemd/system/egressd-apply.service
	test -e $(DESTDIR)/etc/egressd/config.yaml || install -D -m 0644 config/default.yaml $(DESTDIR)/etc/egressd/config.yaml

# Debian package (nfpm): binary, units (ExecStart /usr/bin/egressd), the
# commented config as a conffile, man pages and completions.
deb:
	rm -rf build && mkdir -p build/completion
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o build/egressd ./cmd/egressd
	for u in egressd.service egressd-apply.service; do \
		sed 's#/usr/local/bin/egressd#/usr/bin/egressd#' systemd/$$u >build/$$u; done
	build/egressd man build/man
	build/egressd completion bash >build/completion/egressd.bash
	build/egressd completion zsh >build/completion/_egressd
	VERSION=$${DEB_VERSION:-0.0.0~$(VERSION)} GOARCH=$(GOARCH) $(GO) run $(NFPM) pkg \
		--config packaging/nfpm.yaml --packager deb --target build/

# Container image, offline: build/egressd-image.tar (an OCI layout that is
# also a docker archive) with a static egressd as entrypoint, on no base
# image. IMAGE names it; GOARCH=arm64 builds another architecture.
image:
	mkdir -p build
	CGO_ENABLED=0 GOARCH=$(GOARCH) $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o build/egressd-static ./cmd/egressd
	cd deploy/image && $(GO) run . -binary ../../build/egressd-static -o ../../build/egressd-image.tar \
		-tag $(IMAGE) -arch $(GOARCH) -version $(VERSION)
	@echo "build/egressd-image.tar: $(IMAGE) (load: ctr -n k8s.io images import, docker load -i, kind load image-archive)"

clean:
	rm -rf egressd build
