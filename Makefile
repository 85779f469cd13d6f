# The two commands of the README. Both bootstrap the cached virtualenv on first use (scripts/bootstrap).
PIPELINE ?= examples/demo.yaml

.PHONY: demo test crd helm-lint kind-demo
demo:  ## run the demo pipeline locally: SFT -> preferences -> reward model -> PPO -> evaluation
	scripts/in-venv rlhf run $(PIPELINE)

test:  ## run the whole test suite
	scripts/in-venv python -m pytest $(PYTEST_ARGS)

crd:  ## regenerate crds/ (and the chart's copy) from the pydantic spec
	scripts/in-venv sh -c 'rlhf crd > crds/rlhf-operator.io_rlhfpipelines.yaml'
	cp crds/rlhf-operator.io_rlhfpipelines.yaml helm/rlhf-operator/crds/

helm-lint:  ## helm lint and helm template of the chart (builds the pinned helm once: scripts/build-helm.sh)
	H=$$(scripts/build-helm.sh) && $$H lint --strict helm/rlhf-operator && $$H template rlhf-operator helm/rlhf-operator >/dev/null

kind-demo:  ## kind cluster + images + helm install + examples/kind-pipeline.yaml until Succeeded (docker, kind)
	scripts/kind-demo.sh
