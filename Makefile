# Thin aliases for the scripts in scripts/; the scripts are the source of truth.
.PHONY: setup test demo fuzz bench ci
setup:
	scripts/setup
test:
	scripts/test
demo:
	scripts/demo
fuzz:
	scripts/fuzz
bench:
	scripts/bench
ci:
	bash .ci/run
