// Validates rendered Kubernetes manifests (kustomize output) of Switchyard.
//
// usage: node tests/ops/validate.mjs NAME[@LABEL]=FILE [NAME[@LABEL]=FILE ...]
//   NAME: the overlay (cpu-demo, cpu-demo-hpa, gpu, gpu-hpa, ...: known ones get extra checks)
//   LABEL: optional, shown in the output after NAME, so one run can check many
//          variants of one overlay (validate_k8s.sh's self-test) and tell their
//          results apart
//   FILE: its multi-document YAML, as `kubectl kustomize` / `kustomize build` print it
//
// For every object:
//   - the model class of kubernetes-models / @kubernetes-models/keda /
//     @kubernetes-models/prometheus-operator picked by apiVersion + kind, and
//     its .validate() (JSON schema: types, required fields, enums, formats);
//     a kind with no model fails unless it is in ALLOWLIST;
//   - no unknown fields: .validate() lets them through, so every field name is
//     also checked against the models' TypeScript declarations (a typo like
//     `readinesProbe` or `tolerations` under the wrong parent fails).
// Then Switchyard's own rules over the whole set (see checkSwitchyard):
// pods, Services, every expert served once and mapped by the gateway to its
// pod (one or several experts per pod), PDBs that keep the last replica,
// spread gateways, autoscalers (KEDA: namespace-filtered queries, fallback,
// a saturation trigger, throughput optional), and the monitoring component (checkMonitoring).
// Prints one line per problem and "N passed, M failed" (one per input; each
// input is checked on its own, an exception included); exits 1 if anything
// failed.
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments } from "yaml";

// npm ci --prefix tests/ops puts the packages next to this script.
const NODE_MODULES = path.join(path.dirname(fileURLToPath(import.meta.url)), "node_modules");

// apiVersion/kind -> module path of its model class.
const MODELS = {
  "v1/Namespace": "kubernetes-models/v1/Namespace",
  "v1/ServiceAccount": "kubernetes-models/v1/ServiceAccount",
  "v1/Service": "kubernetes-models/v1/Service",
  "v1/ConfigMap": "kubernetes-models/v1/ConfigMap",
  "v1/Secret": "kubernetes-models/v1/Secret",
  "v1/PersistentVolumeClaim": "kubernetes-models/v1/PersistentVolumeClaim",
  "apps/v1/Deployment": "kubernetes-models/apps/v1/Deployment",
  "batch/v1/Job": "kubernetes-models/batch/v1/Job",
  "policy/v1/PodDisruptionBudget": "kubernetes-models/policy/v1/PodDisruptionBudget",
  "networking.k8s.io/v1/NetworkPolicy": "kubernetes-models/networking.k8s.io/v1/NetworkPolicy",
  "autoscaling/v2/HorizontalPodAutoscaler": "kubernetes-models/autoscaling/v2/HorizontalPodAutoscaler",
  "rbac.authorization.k8s.io/v1/Role": "kubernetes-models/rbac.authorization.k8s.io/v1/Role",
  "rbac.authorization.k8s.io/v1/RoleBinding": "kubernetes-models/rbac.authorization.k8s.io/v1/RoleBinding",
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
  "keda.sh/v1alpha1/TriggerAuthentication": "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication",
  "monitoring.coreos.com/v1/PodMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor",
  "monitoring.coreos.com/v1/ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
  "monitoring.coreos.com/v1/PrometheusRule": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
};

// Kinds allowed without a model (validated by nothing but YAML parsing).
// Empty on purpose: add "group/version/Kind" here only with a reason.
const ALLOWLIST = new Set([]);

// Overlay-specific expectations (perPod: experts per expert pod; monitoring:
// the PrometheusRule and dashboard ConfigMap of components/monitoring).
const OVERLAYS = {
  "cpu-demo": { image: "switchyard:cpu", autoscaler: "ScaledObject", gpu: false, modelPvc: false, perPod: 1, monitoring: true },
  "cpu-demo-hpa": { image: "switchyard:cpu", autoscaler: "HorizontalPodAutoscaler", gpu: false, modelPvc: false, perPod: 1, monitoring: true },
  gpu: { image: "switchyard:gpu", autoscaler: "ScaledObject", gpu: true, modelPvc: true, perPod: 1, monitoring: true },
  "gpu-hpa": { image: "switchyard:gpu", autoscaler: "HorizontalPodAutoscaler", gpu: true, modelPvc: true, perPod: 1, monitoring: true },
  "gpu-tls": { image: "switchyard:gpu", autoscaler: "ScaledObject", gpu: true, modelPvc: true, tls: true, perPod: 1, monitoring: true },
  "gpu-packed": { image: "switchyard:gpu", autoscaler: "ScaledObject", gpu: true, modelPvc: true, perPod: 2, monitoring: true },
};

const NAMESPACE = "switchyard";
const UID = 65532;
const NUM_EXPERTS = 8;  // Mixtral; every render serves each expert exactly once
const GATEWAY_MIN_REPLICAS = 2;

// The sources the generated monitoring objects must equal.
const REPO = path.join(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const RULES_FILE = path.join(REPO, "deploy", "prometheus", "rules.yml");
const RUNBOOK_FILE = path.join(REPO, "docs", "runbook.md");
const DASHBOARD_DIR = path.join(REPO, "deploy", "grafana");

// ---------------------------------------------------------------------------
// Field names from the models' .d.ts files.

const typeIndex = { global: new Map(), byFile: new Map() };

function packageDir(name) {
  return path.join(NODE_MODULES, name);
}

function* walkDts(dir) {
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) yield* walkDts(p);
    else if (entry.name.endsWith(".d.ts")) yield p;
  }
}

// Parses `export interface IX { "field"?: Type; ... }` blocks.
function parseDts(file) {
  const text = fs.readFileSync(file, "utf8");
  const lines = text.split("\n");
  const interfaces = new Map();
  for (let i = 0; i < lines.length; i++) {
    const m = /^export interface (\w+)(?: extends [^{]*)? \{$/.exec(lines[i]);
    if (!m) continue;
    const props = new Map();
    for (i++; i < lines.length && lines[i] !== "}"; i++) {
      const p = /^ {4}"([^"]+)"\??: (.*)$/.exec(lines[i]);
      if (!p) continue;
      let type = p[2];
      if (type === "{") {
        const body = [];
        for (i++; i < lines.length && lines[i] !== "    };"; i++) body.push(lines[i].trim());
        const map = body.length === 1 && /^\[key: string\]: (.*);$/.exec(body[0]);
        type = map ? { map: map[1] } : "any";
      } else {
        type = type.replace(/;$/, "");
      }
      props.set(p[1], type);
    }
    interfaces.set(m[1], props);
  }
  for (const m of text.matchAll(/^export type \{ (\w+) as (\w+)(?:, (\w+) as (\w+))? \};$/gm)) {
    if (interfaces.has(m[1])) typeIndex.global.set(m[2], interfaces.get(m[1]));
  }
  typeIndex.byFile.set(file, interfaces);
  return interfaces;
}

function loadTypeIndex() {
  for (const pkg of ["kubernetes-models", "@kubernetes-models/apimachinery",
                     "@kubernetes-models/keda", "@kubernetes-models/prometheus-operator"]) {
    for (const file of walkDts(packageDir(pkg))) parseDts(file);
  }
}

function resolveType(type, local) {
  if (typeof type === "object") return { kind: "map", of: type.map };
  const arr = /^Array<(.*)>$/.exec(type);
  if (arr) return { kind: "array", of: arr[1] };
  if (/^\w+$/.test(type)) {
    const props = typeIndex.global.get(type) || (local && local.get(type));
    if (props) return { kind: "object", props };
  }
  return { kind: "leaf" };
}

function checkFields(value, type, where, problems, local) {
  const t = resolveType(type, local);
  if (value === null || value === undefined) return;
  if (t.kind === "array" && Array.isArray(value)) {
    value.forEach((v, i) => checkFields(v, t.of, `${where}[${i}]`, problems, local));
  } else if (t.kind === "map" && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) checkFields(v, t.of, `${where}.${k}`, problems, local);
  } else if (t.kind === "object" && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) {
      if (!t.props.has(k)) problems.push(`unknown field ${where}.${k}`);
      else checkFields(v, t.props.get(k), `${where}.${k}`, problems, local);
    }
  }
}

// ---------------------------------------------------------------------------
// Per-object validation.

const modelCache = new Map();

async function modelFor(apiVersion, kind) {
  const key = `${apiVersion}/${kind}`;
  if (!(key in MODELS)) return null;
  if (!modelCache.has(key)) {
    const mod = await import(MODELS[key]);
    const cls = mod[kind];
    const dts = path.join(NODE_MODULES, `${MODELS[key]}.d.ts`);
    const local = typeIndex.byFile.get(dts);
    if (!cls || !local || !local.get(`I${kind}`)) throw new Error(`no model class ${kind} in ${MODELS[key]}`);
    modelCache.set(key, { cls, root: local.get(`I${kind}`), local });
  }
  return modelCache.get(key);
}

function describe(obj) {
  return `${obj.kind}/${obj.metadata?.name ?? "?"}`;
}

async function validateObject(obj, problems) {
  if (!obj || typeof obj !== "object" || !obj.apiVersion || !obj.kind) {
    problems.push(`a document is not a Kubernetes object: ${JSON.stringify(obj)?.slice(0, 80)}`);
    return;
  }
  const model = await modelFor(obj.apiVersion, obj.kind);
  if (!model) {
    if (!ALLOWLIST.has(`${obj.apiVersion}/${obj.kind}`)) {
      problems.push(`${describe(obj)}: no model for ${obj.apiVersion} ${obj.kind} (add it to MODELS or ALLOWLIST)`);
    }
    return;
  }
  try {
    new model.cls(obj).validate();
  } catch (e) {
    problems.push(`${describe(obj)}: ${e.message}`);
  }
  const fieldProblems = [];
  for (const [k, v] of Object.entries(obj)) {
    if (!model.root.has(k)) fieldProblems.push(`unknown field ${k}`);
    else checkFields(v, model.root.get(k), k, fieldProblems, model.local);
  }
  for (const p of fieldProblems) problems.push(`${describe(obj)}: ${p}`);
}

// ---------------------------------------------------------------------------
// Switchyard's rules.

function matches(selector, labels) {
  if (!selector || !labels) return false;
  const ml = selector.matchLabels || {};
  if (Object.keys(ml).length === 0 && !(selector.matchExpressions || []).length) return false;
  for (const [k, v] of Object.entries(ml)) if (labels[k] !== v) return false;
  for (const e of selector.matchExpressions || []) {
    const has = Object.prototype.hasOwnProperty.call(labels, e.key);
    if (e.operator === "In" && !(has && e.values.includes(labels[e.key]))) return false;
    if (e.operator === "NotIn" && has && e.values.includes(labels[e.key])) return false;
    if (e.operator === "Exists" && !has) return false;
    if (e.operator === "DoesNotExist" && has) return false;
  }
  return true;
}

function args(container) {
  const out = new Map();
  for (const a of container.args || []) {
    const m = /^--([^=]+)=(.*)$/s.exec(a);
    if (m) out.set(m[1], m[2]);
  }
  return out;
}

function portOf(address) {
  return Number(String(address).split(":").pop());
}

function checkRestricted(where, podSpec, c, problems) {
  const pod = podSpec.securityContext || {};
  const sc = c.securityContext || {};
  const get = (field) => (sc[field] !== undefined ? sc[field] : pod[field]);
  if (get("runAsNonRoot") !== true) problems.push(`${where}: runAsNonRoot is not true`);
  if (get("runAsUser") !== UID) problems.push(`${where}: runAsUser is not ${UID}`);
  const seccomp = (sc.seccompProfile || pod.seccompProfile || {}).type;
  if (seccomp !== "RuntimeDefault") problems.push(`${where}: seccompProfile is not RuntimeDefault`);
  if (sc.allowPrivilegeEscalation !== false) problems.push(`${where}: allowPrivilegeEscalation is not false`);
  if (sc.readOnlyRootFilesystem !== true) problems.push(`${where}: readOnlyRootFilesystem is not true`);
  const drop = sc.capabilities?.drop || [];
  if (!drop.includes("ALL")) problems.push(`${where}: capabilities do not drop ALL`);
  if ((sc.capabilities?.add || []).length) problems.push(`${where}: adds capabilities`);
  if (sc.privileged) problems.push(`${where}: privileged`);
}

function checkSwitchyard(name, objects, problems) {
  const expect = OVERLAYS[name];
  const of = (kind) => objects.filter((o) => o.kind === kind);
  const deployments = of("Deployment");
  const services = of("Service");
  const pdbs = of("PodDisruptionBudget");
  const autoscalers = [...of("ScaledObject"), ...of("HorizontalPodAutoscaler")];

  // Namespace and Pod Security.
  const ns = of("Namespace").find((n) => n.metadata.name === NAMESPACE);
  if (!ns) problems.push(`no Namespace ${NAMESPACE}`);
  else if (ns.metadata.labels?.["pod-security.kubernetes.io/enforce"] !== "restricted") {
    problems.push(`Namespace ${NAMESPACE} does not enforce the restricted Pod Security profile`);
  }
  for (const o of objects) {
    if (o.kind === "Namespace") continue;
    const want = o.kind === "ConfigMap" && o.metadata.name === "switchyard-prometheus-adapter" ? "monitoring" : NAMESPACE;
    if (o.metadata.namespace !== want) problems.push(`${describe(o)}: namespace ${o.metadata.namespace}, want ${want}`);
  }

  const gateway = deployments.find((d) => d.metadata.name === "switchyard-gateway");
  const experts = deployments.filter((d) => d.metadata.labels?.["app.kubernetes.io/component"] === "expert");
  if (!gateway) problems.push("no Deployment switchyard-gateway");
  if (experts.length === 0) problems.push("no expert Deployments");
  if (deployments.length !== experts.length + (gateway ? 1 : 0)) problems.push("a Deployment is neither the gateway nor an expert");

  const pvcs = new Set(of("PersistentVolumeClaim").map((p) => p.metadata.name));
  for (const d of deployments) {
    const where = describe(d);
    const pod = d.spec.template.spec;
    const labels = d.spec.template.metadata?.labels || {};
    if (!matches(d.spec.selector, labels)) problems.push(`${where}: selector does not match its pod labels`);
    for (const c of [...(pod.initContainers || []), ...pod.containers]) checkRestricted(`${where} container ${c.name}`, pod, c, problems);
    if (pod.automountServiceAccountToken !== false) problems.push(`${where}: mounts a service account token`);
    for (const c of pod.containers) {
      const cw = `${where} container ${c.name}`;
      const grpcPort = (c.ports || []).find((p) => p.name === "grpc")?.containerPort;
      const metricsPort = (c.ports || []).find((p) => p.name === "metrics")?.containerPort;
      if (!grpcPort) problems.push(`${cw}: no port named grpc`);
      // OpenMP sized to the pod's CPU request, not the node's CPUs.
      const omp = (c.env || []).find((e) => e.name === "OMP_NUM_THREADS");
      const ref = omp?.valueFrom?.resourceFieldRef;
      if (!omp) problems.push(`${cw}: no OMP_NUM_THREADS (OpenMP would start a thread per node CPU)`);
      else if (!ref || ref.resource !== "requests.cpu" || ref.containerName !== c.name || String(ref.divisor) !== "1") {
        problems.push(`${cw}: OMP_NUM_THREADS is not this container's requests.cpu in whole CPUs`);
      }
      if (metricsPort !== 9090) problems.push(`${cw}: no port named metrics on 9090`);
      // Plaintext servers: gRPC probes. TLS servers (--tls-cert): Kubernetes'
      // gRPC probes cannot speak TLS, so an exec of `switchyard health`
      // against 127.0.0.1 with a CA.
      const servesTls = args(c).has("tls-cert");
      const mismatch = "probe does not match the server's transport";
      for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
        const p = c[probe];
        if (!p) {
          problems.push(`${cw}: no ${probe}`);
        } else if (p.grpc) {
          if (servesTls) problems.push(`${cw}: ${probe} is a plaintext gRPC probe of a TLS server: ${mismatch}`);
          else if (p.grpc.port !== grpcPort) problems.push(`${cw}: ${probe} probes port ${p.grpc.port}, not the grpc port ${grpcPort}`);
        } else if (p.exec) {
          const cmd = p.exec.command || [];
          const server = cmd[cmd.indexOf("--server") + 1];
          if (!/(^|\/)switchyard$/.test(cmd[0] || "") || cmd[1] !== "health") {
            problems.push(`${cw}: ${probe} execs ${JSON.stringify(cmd.slice(0, 2))}, not switchyard health`);
          } else if (!servesTls) {
            problems.push(`${cw}: ${probe} runs switchyard health against a plaintext server: ${mismatch}`);
          } else if (server !== `127.0.0.1:${grpcPort}`) {
            problems.push(`${cw}: ${probe} checks ${server}, not 127.0.0.1:${grpcPort}`);
          } else if (!cmd.includes("--tls-ca")) {
            problems.push(`${cw}: ${probe} runs switchyard health without --tls-ca against a TLS server`);
          }
        } else {
          problems.push(`${cw}: ${probe} is neither a gRPC probe nor an exec of switchyard health`);
        }
      }
      if (expect?.tls) {
        const a = args(c);
        const want = c.name === "gateway"
          ? ["tls-cert", "tls-key", "expert-tls-ca", "expert-tls-cert", "expert-tls-key"]
          : ["tls-cert", "tls-key", "tls-client-ca"];
        for (const flag of want) if (!a.has(flag)) problems.push(`${cw}: TLS overlay without --${flag}`);
      }
      if (!c.resources?.requests?.cpu || !c.resources?.requests?.memory || !c.resources?.limits?.memory) {
        problems.push(`${cw}: needs cpu and memory requests and a memory limit`);
      }
      if (expect) {
        if (c.image !== expect.image) problems.push(`${cw}: image ${c.image}, want ${expect.image}`);
        const gpus = c.resources?.limits?.["nvidia.com/gpu"];
        if (expect.gpu && String(gpus) !== "1") problems.push(`${cw}: no nvidia.com/gpu: 1 limit`);
        if (!expect.gpu && gpus !== undefined) problems.push(`${cw}: asks for a GPU`);
      }
      // A pod with a GPU computes on it; one without must not try to.
      const device = args(c).get("device") ?? "cpu";
      const hasGpu = c.resources?.limits?.["nvidia.com/gpu"] !== undefined;
      if (hasGpu && device !== "cuda") {
        problems.push(`${cw}: has a GPU but --device=${device}: --device does not match the GPU request`);
      }
      if (!hasGpu && device !== "cpu") {
        problems.push(`${cw}: has no GPU but --device=${device}: --device does not match the GPU request`);
      }
      const a = args(c);
      if (a.get("model") !== "/models/mixtral") problems.push(`${cw}: --model is not /models/mixtral`);
      const modelMount = (c.volumeMounts || []).find((m) => m.mountPath === "/models/mixtral");
      if (!modelMount || modelMount.readOnly !== true) problems.push(`${cw}: /models/mixtral is not mounted read-only`);
      const volume = modelMount && (pod.volumes || []).find((v) => v.name === modelMount.name);
      if (volume?.persistentVolumeClaim) {
        if (!pvcs.has(volume.persistentVolumeClaim.claimName)) problems.push(`${cw}: PVC ${volume.persistentVolumeClaim.claimName} is not in the render`);
        if (volume.persistentVolumeClaim.readOnly !== true) problems.push(`${cw}: the model PVC is not read-only`);
      }
      if (expect && expect.modelPvc !== Boolean(volume?.persistentVolumeClaim?.claimName === "switchyard-model")) {
        problems.push(`${cw}: the model volume should ${expect.modelPvc ? "" : "not "}be the PVC switchyard-model`);
      }
      if (grpcPort && portOf(a.get("listen")) !== grpcPort) problems.push(`${cw}: --listen is not on the grpc port`);
      if (metricsPort && portOf(a.get("metrics-listen")) !== metricsPort) problems.push(`${cw}: --metrics-listen is not on the metrics port`);
      // Experts: the frame socket the gateway sends a pod's calls to (TLS
      // where the gRPC port is), on a fixed port: the NetworkPolicy must
      // open it, and the default is a free one.
      if (d.metadata.labels?.["app.kubernetes.io/component"] === "expert") {
        const frameListen = a.get("frame-listen");
        const framesPort = (c.ports || []).find((p) => p.name === "frames")?.containerPort;
        if (!framesPort) {
          problems.push(`${cw}: no port named frames`);
        } else if (portOf(frameListen) !== framesPort) {
          problems.push(`${cw}: --frame-listen is not on the frames port ${framesPort}`);
        }
      }
    }
    // One PodDisruptionBudget per Deployment.
    const covering = pdbs.filter((p) => matches(p.spec.selector, labels));
    if (covering.length !== 1) problems.push(`${where}: ${covering.length} PodDisruptionBudgets select its pods, want 1`);
  }

  // Experts: index, headless Service, autoscaler.
  const expertService = new Map();  // pod's expert label ("3", "0-1") -> Service
  const servedBy = new Map();  // expert index -> Deployments whose --experts list it
  for (const d of experts) {
    const where = describe(d);
    const labels = d.spec.template.metadata.labels;
    const c = d.spec.template.spec.containers[0];
    const a = args(c);
    const flag = a.get("experts");
    const indices = /^\d+(,\d+)*$/.test(flag || "") ? flag.split(",") : [];
    if (!indices.length) problems.push(`${where}: --experts must be a comma-separated list of expert indices, got ${flag}`);
    const index = indices.join("-");  // the label value and name part: "3", or "0-1"
    if (labels["switchyard/expert"] !== index) problems.push(`${where}: label switchyard/expert ${labels["switchyard/expert"]} != --experts ${flag}`);
    if (d.metadata.name !== `switchyard-expert-${index}`) problems.push(`${where}: name should be switchyard-expert-${index} for --experts ${flag}`);
    if (expect && indices.length > expect.perPod) problems.push(`${where}: serves ${indices.length} experts, want at most ${expect.perPod} per pod`);
    for (const e of indices) {
      if (!servedBy.has(e)) servedBy.set(e, []);
      servedBy.get(e).push(d);
    }
    if (!a.has("max-connection-age-ms") || Number(a.get("max-connection-age-ms")) <= 0) problems.push(`${where}: needs --max-connection-age-ms > 0 so the gateway finds new replicas`);
    const svcs = services.filter((s) => s.spec.selector && matches({ matchLabels: s.spec.selector }, labels));
    const headless = svcs.filter((s) => s.spec.clusterIP === "None");
    if (headless.length !== 1) problems.push(`${where}: ${headless.length} headless Services select its pods, want 1`);
    else {
      const s = headless[0];
      const port = (s.spec.ports || []).find((p) => p.port === portOf(a.get("listen")));
      if (!port) problems.push(`${describe(s)}: does not expose ${where}'s gRPC port`);
      // The Service must select this expert's pods only.
      for (const other of experts) {
        if (other !== d && matches({ matchLabels: s.spec.selector }, other.spec.template.metadata.labels)) {
          problems.push(`${describe(s)}: also selects ${describe(other)}`);
        }
      }
      expertService.set(index, s);
    }
    const mine = autoscalers.filter((x) => x.spec.scaleTargetRef?.name === d.metadata.name);
    if (expect) {
      if (mine.length !== 1 || mine[0].kind !== expect.autoscaler) {
        problems.push(`${where}: ${mine.length} autoscalers (${mine.map((x) => x.kind).join(", ")}), want one ${expect.autoscaler}`);
      }
    } else if (mine.length > 1) problems.push(`${where}: ${mine.length} autoscalers`);
    if (mine.length && d.spec.replicas !== undefined) problems.push(`${where}: sets replicas although ${describe(mine[0])} owns them`);
    for (const x of mine) checkAutoscaler(x, indices, problems);
  }
  for (let e = 0; e < NUM_EXPERTS; e++) {
    const by = servedBy.get(String(e)) || [];
    if (by.length !== 1) problems.push(`expert ${e} is served by ${by.length} Deployments (${by.map(describe).join(", ")}), want exactly 1`);
  }
  for (const e of servedBy.keys()) if (!(Number(e) < NUM_EXPERTS)) problems.push(`expert ${e} is served, but the model has ${NUM_EXPERTS} experts`);
  for (const x of autoscalers) {
    if (!experts.some((d) => d.metadata.name === x.spec.scaleTargetRef?.name)) problems.push(`${describe(x)}: scales no expert Deployment`);
  }

  // The gateway's --experts SPEC maps every expert, exactly once, to the
  // headless Service of the pod that serves it.
  if (gateway) {
    const spec = args(gateway.spec.template.spec.containers[0]).get("experts") || "";
    const mapped = new Map();
    for (const entry of spec.split(";").filter(Boolean)) {
      const [e, targets] = entry.split("=");
      if (mapped.has(e)) problems.push(`gateway --experts maps expert ${e} twice`);
      mapped.set(e, (targets || "").split("|"));
    }
    for (const [e, by] of servedBy) {
      if (by.length !== 1) continue;
      const s = expertService.get(by[0].spec.template.metadata.labels["switchyard/expert"]);
      if (!s) continue;
      const port = s.spec.ports[0].port;
      const want = `dns:///${s.metadata.name}.${s.metadata.namespace}.svc.cluster.local:${port}`;
      const got = mapped.get(e);
      if (!got || got.length !== 1 || got[0] !== want) problems.push(`gateway --experts maps expert ${e} to ${got}, want ${want}`);
    }
    for (const e of mapped.keys()) if (!servedBy.has(e)) problems.push(`gateway --experts maps expert ${e}, which no Deployment serves`);

    // Several gateways behind one Service, spread over nodes, one always up.
    const where = describe(gateway);
    const glabels = gateway.spec.template.metadata.labels;
    if (!(gateway.spec.replicas >= GATEWAY_MIN_REPLICAS)) problems.push(`${where}: gateway replicas ${gateway.spec.replicas}, want >= ${GATEWAY_MIN_REPLICAS}`);
    const spread = (gateway.spec.template.spec.topologySpreadConstraints || []).some((t) =>
      t.topologyKey === "kubernetes.io/hostname" && matches(t.labelSelector, glabels));
    const anti = (gateway.spec.template.spec.affinity?.podAntiAffinity?.preferredDuringSchedulingIgnoredDuringExecution || [])
      .some((w) => w.podAffinityTerm?.topologyKey === "kubernetes.io/hostname" && matches(w.podAffinityTerm.labelSelector, glabels));
    if (!spread && !anti) problems.push(`${where}: no topology spread or anti-affinity over kubernetes.io/hostname for its pods`);
    const front = services.filter((s) => s.spec.clusterIP !== "None" && s.spec.selector && matches({ matchLabels: s.spec.selector }, glabels) &&
      (s.spec.ports || []).some((p) => p.targetPort === "grpc" || p.targetPort === portOf(args(gateway.spec.template.spec.containers[0]).get("listen"))));
    if (front.length !== 1) problems.push(`${where}: ${front.length} load-balancing Services in front of its grpc port, want 1`);
  }

  // PodDisruptionBudgets never let a drain take the last replica, and let one
  // of several gateways go.
  for (const p of pdbs) {
    const where = describe(p);
    if (p.spec.maxUnavailable !== undefined) problems.push(`${where}: uses maxUnavailable, which lets a drain evict the only replica: want minAvailable >= 1`);
    if (!(Number.isInteger(p.spec.minAvailable) && p.spec.minAvailable >= 1)) problems.push(`${where}: minAvailable ${p.spec.minAvailable}, want an integer >= 1`);
    // Experts may sit at one replica (a drain then waits: deploy/README.md);
    // the gateway's fixed replica count must leave room for one eviction.
    if (gateway && matches(p.spec.selector, gateway.spec.template.metadata?.labels) &&
        gateway.spec.replicas !== undefined && gateway.spec.replicas <= p.spec.minAvailable) {
      problems.push(`${where}: minAvailable ${p.spec.minAvailable} >= the gateway's ${gateway.spec.replicas} replicas: no drain could proceed`);
    }
  }

  if (expect?.monitoring) checkMonitoring(objects, problems);

  // NetworkPolicy: only gateway pods reach an expert's gRPC port and its
  // frame port (where it has one on).
  const policies = of("NetworkPolicy");
  for (const d of experts) {
    const labels = d.spec.template.metadata.labels;
    const a = args(d.spec.template.spec.containers[0]);
    const ports = [[portOf(a.get("listen")), "grpc"]];
    if (a.has("frame-listen") && a.get("frame-listen") !== "off") ports.push([portOf(a.get("frame-listen")), "frames"]);
    const selecting = policies.filter((p) => (p.spec.policyTypes || ["Ingress"]).includes("Ingress") &&
      (Object.keys(p.spec.podSelector || {}).length === 0 || matches(p.spec.podSelector, labels)));
    if (!selecting.length) problems.push(`${describe(d)}: no NetworkPolicy isolates its pods`);
    for (const [port, name] of ports) {
      let gatewayAllowed = false;
      for (const p of selecting) {
        for (const rule of p.spec.ingress || []) {
          const coversPort = !rule.ports || rule.ports.some((rp) => rp.port === port || rp.port === name);
          if (!coversPort) continue;
          const from = rule.from || [];
          const onlyGateway = from.length > 0 && from.every((f) => f.podSelector && !f.namespaceSelector && !f.ipBlock &&
            gateway && matches(f.podSelector, gateway.spec.template.metadata.labels) &&
            experts.every((x) => !matches(f.podSelector, x.spec.template.metadata.labels)));
          if (!onlyGateway) problems.push(`${describe(p)}: lets more than gateway pods reach ${describe(d)} on ${port}`);
          else gatewayAllowed = true;
        }
      }
      if (!gatewayAllowed) problems.push(`${describe(d)}: no NetworkPolicy lets the gateway reach port ${port}`);
    }
  }

  // Prometheus Operator scrapes every pod's metrics port.
  const monitors = of("PodMonitor");
  for (const d of deployments) {
    const labels = d.spec.template.metadata.labels;
    const m = monitors.filter((pm) => matches(pm.spec.selector, labels));
    if (m.length !== 1) problems.push(`${describe(d)}: ${m.length} PodMonitors select its pods, want 1`);
    else if (!m[0].spec.podMetricsEndpoints.some((e) => e.port === "metrics")) problems.push(`${describe(m[0])}: does not scrape the port named metrics`);
  }
}

// Metric selectors (name{...}) of a PromQL expression: [[name, matchers text]].
function selectors(expr) {
  return [...String(expr).matchAll(/\b(switchyard_[A-Za-z0-9_]+)\s*(\{([^}]*)\})?/g)].map((m) => [m[1], m[3] || ""]);
}

function checkAutoscaler(x, indices, problems) {
  const where = describe(x);
  const label = indices.join("-");
  let behavior;
  if (x.kind === "ScaledObject") {
    if (!(x.spec.minReplicaCount >= 1)) problems.push(`${where}: minReplicaCount must be >= 1 (the gateway needs every expert)`);
    if (!(x.spec.maxReplicaCount >= x.spec.minReplicaCount)) problems.push(`${where}: maxReplicaCount < minReplicaCount`);
    const fb = x.spec.fallback;
    if (!fb) problems.push(`${where}: no fallback (replicas to hold while Prometheus cannot be queried)`);
    else {
      if (!(Number.isInteger(fb.failureThreshold) && fb.failureThreshold >= 1)) problems.push(`${where}: fallback.failureThreshold must be an integer >= 1`);
      if (!(fb.replicas >= Math.max(1, x.spec.minReplicaCount || 1))) problems.push(`${where}: fallback.replicas must be >= minReplicaCount and >= 1`);
      if (fb.replicas > x.spec.maxReplicaCount) problems.push(`${where}: fallback.replicas ${fb.replicas} > maxReplicaCount ${x.spec.maxReplicaCount}`);
    }
    const triggers = x.spec.triggers || [];
    if (!triggers.length) problems.push(`${where}: no triggers`);
    const expertMatcher = indices.length === 1 ? `expert="${indices[0]}"` : `expert=~"${indices.join("|")}"`;
    // The throughput trigger (tokens/s) is optional: its threshold is device
    // capacity, left out where it is unmeasured (the GPU overlays). The
    // saturation trigger is device-independent and required.
    let saturation = false;
    for (const [i, t] of triggers.entries()) {
      const tw = `${where} trigger ${i}`;
      if (t.type !== "prometheus") { problems.push(`${tw}: type ${t.type}, want prometheus`); continue; }
      // KEDA rejects a fallback unless every trigger is AverageValue.
      if (t.metricType !== "AverageValue") problems.push(`${tw}: metricType must be AverageValue (per replica; KEDA's fallback needs it)`);
      if (!(Number(t.metadata?.threshold) > 0)) problems.push(`${tw}: threshold must be a positive number`);
      if (!t.metadata?.serverAddress) problems.push(`${tw}: no serverAddress`);
      const query = String(t.metadata?.query || "").replace(/\s+/g, "");
      const sels = selectors(query);
      if (!sels.length) problems.push(`${tw}: query ${query} reads no switchyard metric`);
      for (const [name, m] of sels) {
        if (!m.split(",").includes(`namespace="${NAMESPACE}"`)) problems.push(`${tw}: ${name} has no namespace="${NAMESPACE}" matcher`);
      }
      const names = new Set(sels.map(([n]) => n));
      if (names.has("switchyard_expert_tokens_total")) {
        const want = `sum(rate(switchyard_expert_tokens_total{namespace="${NAMESPACE}",${expertMatcher}}[1m]))`;
        if (query !== want) problems.push(`${where}: query ${query}, want ${want}`);
      }
      if (names.has("switchyard_expert_busy_seconds_total") || names.has("switchyard_expert_queue_seconds_bucket") ||
          names.has("switchyard_expert_queue_seconds_sum")) {
        saturation = true;
        if (!sels.every(([, m]) => m.split(",").includes(`experts="${label}"`))) problems.push(`${tw}: saturation query ${query} is not filtered to experts="${label}"`);
      }
    }
    if (!saturation) problems.push(`${where}: no saturation trigger (busy ratio or queue time)`);
    behavior = x.spec.advanced?.horizontalPodAutoscalerConfig?.behavior;
  } else {
    if (!(x.spec.minReplicas >= 1)) problems.push(`${where}: minReplicas must be >= 1`);
    const m = x.spec.metrics || [];
    const pods = (name) => m.some((mm) => mm.type === "Pods" && mm.pods.metric.name === name &&
      mm.pods.target.type === "AverageValue" && parseQuantity(mm.pods.target.averageValue) > 0);
    const tokens = m.find((mm) => mm.pods?.metric?.name === "switchyard_expert_tokens_per_second");
    if (tokens && !pods("switchyard_expert_tokens_per_second")) problems.push(`${where}: the Pods metric switchyard_expert_tokens_per_second needs a positive AverageValue target`);
    if (!pods("switchyard_expert_busy_ratio")) problems.push(`${where}: want a Pods metric switchyard_expert_busy_ratio (saturation) with a positive AverageValue target`);
    behavior = x.spec.behavior;
  }
  if (behavior?.scaleUp?.stabilizationWindowSeconds !== 0) problems.push(`${where}: scaleUp.stabilizationWindowSeconds must be 0`);
  if (behavior?.scaleDown?.stabilizationWindowSeconds !== 300) problems.push(`${where}: scaleDown.stabilizationWindowSeconds must be 300`);
  if (!(behavior?.scaleUp?.policies || []).length || !(behavior?.scaleDown?.policies || []).length) problems.push(`${where}: needs scaleUp and scaleDown policies`);
}

// JSON with object keys sorted: kustomize reorders keys, values must match.
function canonical(v) {
  if (Array.isArray(v)) return `[${v.map(canonical).join(",")}]`;
  if (v && typeof v === "object") return `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(",")}}`;
  return JSON.stringify(v);
}

function parseQuantity(q) {
  const m = /^([0-9.]+)(m?)$/.exec(String(q));
  if (!m) return NaN;
  return Number(m[1]) / (m[2] === "m" ? 1000 : 1);
}

// GitHub's heading anchors: lower case, punctuation dropped, spaces to '-'.
function anchors(markdown) {
  const out = new Set();
  for (const m of markdown.matchAll(/^#{1,6}\s+(.*)$/gm)) {
    out.add(m[1].trim().toLowerCase().replace(/[^\w\- ]/g, "").replace(/ /g, "-"));
  }
  return out;
}

// The PrometheusRule equals deploy/prometheus/rules.yml, every alert has a
// runbook_url into docs/runbook.md; the dashboard ConfigMaps carry the
// sidecar's label and equal deploy/grafana.
function checkMonitoring(objects, problems) {
  const rules = objects.filter((o) => o.kind === "PrometheusRule");
  if (rules.length !== 1) problems.push(`${rules.length} PrometheusRules, want 1 (components/monitoring)`);
  const source = parseAllDocuments(fs.readFileSync(RULES_FILE, "utf8"))[0].toJS();
  const runbook = anchors(fs.readFileSync(RUNBOOK_FILE, "utf8"));
  for (const r of rules) {
    const where = describe(r);
    if (canonical(r.spec.groups) !== canonical(source.groups)) {
      problems.push(`${where}: groups differ from deploy/prometheus/rules.yml (run k8s/generate-monitoring.py)`);
    }
    let alerts = 0;
    for (const g of r.spec.groups || []) {
      for (const rule of g.rules || []) {
        if (!rule.alert) continue;
        alerts++;
        const url = rule.annotations?.runbook_url;
        const m = /^docs\/runbook\.md#([\w-]+)$/.exec(url || "");
        if (!url) problems.push(`${where}: alert ${rule.alert} has no runbook_url`);
        else if (!m) problems.push(`${where}: alert ${rule.alert}: runbook_url ${url} is not docs/runbook.md#SECTION`);
        else if (!runbook.has(m[1])) problems.push(`${where}: alert ${rule.alert}: docs/runbook.md has no section #${m[1]}`);
        else if (m[1] !== rule.alert.toLowerCase()) problems.push(`${where}: alert ${rule.alert}: runbook_url points at #${m[1]}, not its own section`);
        if (!rule.labels?.severity) problems.push(`${where}: alert ${rule.alert} has no severity label`);
      }
    }
    if (!alerts) problems.push(`${where}: no alerts`);
  }
  const dashboards = objects.filter((o) => o.kind === "ConfigMap" && o.metadata.labels?.grafana_dashboard !== undefined);
  const files = fs.readdirSync(DASHBOARD_DIR).filter((f) => f.endsWith(".json"));
  for (const f of files) {
    const cm = dashboards.find((o) => o.data && f in o.data);
    if (!cm) { problems.push(`no ConfigMap with label grafana_dashboard carries deploy/grafana/${f}`); continue; }
    if (cm.metadata.labels.grafana_dashboard !== "1") problems.push(`${describe(cm)}: label grafana_dashboard is ${JSON.stringify(cm.metadata.labels.grafana_dashboard)}, want "1"`);
    let parsed;
    try { parsed = JSON.parse(cm.data[f]); } catch (e) { problems.push(`${describe(cm)}: ${f} is not JSON: ${e.message}`); continue; }
    const want = JSON.parse(fs.readFileSync(path.join(DASHBOARD_DIR, f), "utf8"));
    if (canonical(parsed) !== canonical(want)) problems.push(`${describe(cm)}: ${f} differs from deploy/grafana/${f} (run k8s/generate-monitoring.py)`);
  }
  const unlabelled = objects.filter((o) => o.kind === "ConfigMap" && o.metadata.labels?.grafana_dashboard === undefined &&
    Object.keys(o.data || {}).some((k) => k.endsWith(".json") && files.includes(k)));
  for (const o of unlabelled) problems.push(`${describe(o)}: carries a dashboard but has no grafana_dashboard label`);
}

// ---------------------------------------------------------------------------

async function main() {
  const inputs = process.argv.slice(2);
  if (!inputs.length || inputs.some((a) => !a.includes("="))) {
    console.error("usage: node validate.mjs NAME[@LABEL]=FILE [NAME[@LABEL]=FILE ...]");
    process.exit(2);
  }
  loadTypeIndex();
  let passed = 0;
  let failed = 0;
  for (const input of inputs) {
    const [shown, file] = input.split(/=(.*)/s);
    const name = shown.split("@")[0];
    const problems = [];
    const objects = [];
    try {
      for (const doc of parseAllDocuments(fs.readFileSync(file, "utf8"))) {
        if (doc.errors.length) {
          problems.push(`YAML: ${doc.errors.map((e) => e.message).join("; ")}`);
          continue;
        }
        const obj = doc.toJS();
        if (obj !== null) objects.push(obj);
      }
      for (const obj of objects) await validateObject(obj, problems);
      if (objects.length) checkSwitchyard(name, objects, problems);
      else problems.push("no objects");
    } catch (e) {
      problems.push(`validator error: ${e && e.stack ? e.stack : e}`);
    }
    if (problems.length) {
      failed++;
      for (const p of problems) console.log(`FAIL ${shown}: ${p}`);
    } else {
      passed++;
      const kinds = {};
      for (const o of objects) kinds[o.kind] = (kinds[o.kind] || 0) + 1;
      console.log(`ok   ${shown}: ${objects.length} objects valid (${Object.entries(kinds).map(([k, n]) => `${n} ${k}`).join(", ")})`);
    }
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
