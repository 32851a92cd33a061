// The deployment files agree with the code: no Docker engine or cluster runs here, so
// this checks that they parse, that every actor command names a real role and a job
// file that loads, and that ports and endpoints line up. nats.conf is checked by
// nats-server itself (`-t`), with the keys `flotilla infra account` makes; its job
// account is exactly what shared/bus/permissions.ts derives (test/security.permissions
// runs it). Security: nothing published beyond the host, every actor with its own role's
// credential, the Kubernetes NATS a 3-node JetStream cluster fed from Secrets.
import { execFileSync } from "node:child_process"
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { afterAll, describe, expect, it } from "vitest"
import { parse, parseAllDocuments } from "yaml"
import { loadJobFile, resolveJob } from "../shared/config/job.ts"
import { findNatsServerBinary } from "../shared/bus/local-server.ts"
import { roleOfActor } from "../shared/bus/permissions.ts"
import { ROLES } from "../cli/launch.ts"
import { envRefAccount, parseWorkers, routeEnv, workerSeedName, writeAccount } from "../cli/infra.ts"

const bin = () => {
  const b = findNatsServerBinary()
  if (!b) throw new Error("nats-server not found: apt-get install -y nats-server")
  return b
}
const tmp = mkdtempSync(join(tmpdir(), "flotilla-infra-"))
afterAll(() => rmSync(tmp, { recursive: true, force: true }))
/** The environment the shipped configs read: job gpt's public keys, the route URLs. */
const shippedEnv = (() => {
  writeAccount("gpt", 2, join(tmp, "gpt"))
  const lines = [...readFileSync(join(tmp, "gpt", "nkeys.env"), "utf8").trim().split("\n"), ...routeEnv(["nats-1", "nats-2", "nats-3"]).trim().split("\n")]
  return Object.fromEntries(lines.map((l) => [l.slice(0, l.indexOf("=")), l.slice(l.indexOf("=") + 1)]))
})()
/** `nats-server -t -c file` with `env` (throws with the server's complaint when it is not valid). */
const check = (file: string, env: Record<string, string> = shippedEnv) =>
  execFileSync(bin(), ["-t", "-c", file], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], env: { PATH: process.env.PATH, ...env } })
/** The `JOB_GPT: { … }` account block of a config, with its leading comment line. */
const gptAccount = (text: string) => {
  const start = text.indexOf("  # job gpt:")
  const end = text.indexOf("\n  }\n", start)
  return text.slice(start, end + 5)
}

describe("infra/docker-compose.yml", () => {
  const compose = parse(readFileSync("infra/docker-compose.yml", "utf8"), { merge: true })
  const actors = Object.entries<any>(compose.services).filter(([, s]) => Array.isArray(s.command) && s.command[0] === "launch")

  it("runs every role of a data-parallel job", () => {
    const roles = new Set(actors.map(([, s]) => s.command[1]))
    for (const r of ["loader", "scheduler", "param-server", "worker", "evaluator"]) expect(roles).toContain(r)
    for (const r of roles) expect(ROLES as readonly string[]).toContain(r)
  })

  it("points every actor at a job file that loads, and covers its parameter-server shards", () => {
    const files = new Set(actors.map(([, s]) => s.command[s.command.indexOf("--job") + 1]))
    expect(files.size).toBe(1)
    const job = loadJobFile([...files][0])
    const shards = actors.filter(([, s]) => s.command[1] === "param-server").map(([, s]) => Number(s.command[s.command.indexOf("--shard") + 1]))
    expect(shards.sort()).toEqual(Array.from({ length: job.topology.psShards }, (_, k) => k))
  })

  it("wires NATS and Jaeger's OTLP endpoint consistently", () => {
    const env = actors[0][1].environment
    expect(env.NATS_URL).toBe("nats://nats:4222")
    expect(compose.services.nats.ports).toEqual(["127.0.0.1:4222:4222"])
    const otlp = new URL(env.OTEL_EXPORTER_OTLP_ENDPOINT)
    expect(otlp.hostname).toBe("jaeger")
    expect(compose.services.jaeger.ports).toContain(`127.0.0.1:${otlp.port}:${otlp.port}`)
    expect(compose.services.jaeger.environment.COLLECTOR_OTLP_ENABLED).toBe("true")
    expect(compose.services.nats.image).toMatch(/^nats:/)
    expect(compose.services.jaeger.image).toMatch(/^jaegertracing\/all-in-one:/)
  })
})

describe("docker-compose security", () => {
  const compose = parse(readFileSync("infra/docker-compose.yml", "utf8"), { merge: true })
  it("publishes nothing beyond the host", () => {
    for (const [name, svc] of Object.entries<any>(compose.services)) {
      for (const p of svc.ports ?? []) expect(String(p), `${name} publishes ${p}`).toMatch(/^127\.0\.0\.1:/)
    }
  })

  it("gives each actor its own role's nkey seed, and NATS the job's public keys", () => {
    const actors = Object.entries<any>(compose.services).filter(([, s]) => Array.isArray(s.command) && s.command[0] === "launch")
    const job = loadJobFile("jobs/gpt-dp2.yaml")
    for (const [name, svc] of actors) {
      const role = svc.command[1] === "param-server" ? roleOfActor("param-server", Number(svc.command[svc.command.indexOf("--shard") + 1])) : svc.command[1]
      expect(svc.environment.NATS_NKEY, name).toBe("/run/secrets/nkey")
      expect(svc.secrets, name).toEqual([{ source: `${job.job}-${role}`, target: "nkey" }])
      expect(compose.secrets[`${job.job}-${role}`].file).toBe(`../nats-accounts/gpt/${role}.nk`)
    }
    expect(compose.services.nats.env_file).toEqual(["../nats-accounts/gpt/nkeys.env"])
    expect(compose.services.nats.command).toEqual(["-c", "/etc/nats/nats.conf"])
  })
})

describe("infra/nats/nats.conf", () => {
  const text = readFileSync("infra/nats/nats.conf", "utf8")
  it("is valid for nats-server with the keys `flotilla infra account gpt` makes, and refuses to start without them", () => {
    check("infra/nats/nats.conf")
    expect(() => check("infra/nats/nats.conf", {})).toThrow(/FLOTILLA_GPT_\w+_NKEY/)
  })

  it("holds job gpt's account exactly as shared/bus/permissions.ts derives it, and admits no anonymous client", () => {
    // regenerate with: node bin/flotilla.ts infra account gpt --shards 2 --env-refs
    expect(gptAccount(text)).toBe(envRefAccount("gpt", 2))
    expect(text).not.toMatch(/no_auth_user|authorization\s*\{|password/)
    expect(text).toMatch(/^http: 127\.0\.0\.1:8222/m)
  })
})

describe("infra/nats/cluster (3 nodes)", () => {
  const nodes = [1, 2, 3].map((i) => `infra/nats/cluster/nats-${i}.conf`)
  const accounts = (text: string) => text.slice(text.indexOf("accounts {"))

  it("each node's config is valid for nats-server, with a unique name and authenticated routes to all three", () => {
    const names = new Set<string>()
    for (const file of nodes) {
      check(file)
      expect(() => check(file, Object.fromEntries(Object.entries(shippedEnv).filter(([k]) => !k.startsWith("FLOTILLA_ROUTE"))))).toThrow(/FLOTILLA_ROUTE/)
      const text = readFileSync(file, "utf8")
      names.add(/^server_name:\s*(\S+)/m.exec(text)![1])
      expect(text).toMatch(/include \.\/common\.conf/)
      expect(text).toMatch(/name: flotilla/)
      expect(text).toMatch(/authorization \{ user: route, password: \$FLOTILLA_ROUTE_PASSWORD/)
      for (const peer of [1, 2, 3]) expect(text).toMatch(new RegExp(`\\$FLOTILLA_ROUTE_${peer}\\b`))
      expect(text).not.toMatch(/change-me/)
    }
    expect([...names].sort()).toEqual(["nats-1", "nats-2", "nats-3"])
    // the URLs `flotilla infra routes` writes carry that password, to every node
    const env = routeEnv(["nats-1", "nats-2", "nats-3"], "pw")
    for (const peer of [1, 2, 3]) expect(env).toContain(`FLOTILLA_ROUTE_${peer}=nats-route://route:pw@nats-${peer}:6222`)
  })

  it("carries the same job accounts as the single-server nats.conf", () => {
    expect(accounts(readFileSync("infra/nats/cluster/common.conf", "utf8"))).toBe(accounts(readFileSync("infra/nats/nats.conf", "utf8")))
  })

  it("is wired into docker-compose's `cluster` profile", () => {
    const compose = parse(readFileSync("infra/docker-compose.yml", "utf8"), { merge: true })
    for (const i of [1, 2, 3]) {
      const svc = compose.services[`nats-${i}`]
      expect(svc.profiles).toEqual(["cluster"])
      expect(svc.command).toEqual(["-c", `/etc/nats/cluster/nats-${i}.conf`])
    }
  })
})

describe("infra/k8s/flotilla-job.yaml", () => {
  const docs = parseAllDocuments(readFileSync("infra/k8s/flotilla-job.yaml", "utf8")).map((d) => d.toJS())
  const cm = docs.find((d) => d.kind === "ConfigMap")
  const job = resolveJob(parse(cm.data["job.yaml"]), "configmap")
  it("parses, and its job ConfigMap resolves", () => {
    const ps = docs.find((d) => d.kind === "StatefulSet")
    expect(ps.spec.replicas).toBe(job.topology.psShards)
    const worker = docs.find((d) => d.kind === "Deployment" && d.metadata.name === "flotilla-worker")
    expect(worker.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"]).toBe(1)
  })

  it("connects every container as its own role, its seed mounted from the job's Secret", () => {
    for (const d of docs.filter((x) => x.kind === "Deployment" || x.kind === "StatefulSet")) {
      const spec = d.spec.template.spec
      expect(d.spec.template.metadata.labels["app.kubernetes.io/part-of"], d.metadata.name).toBe("flotilla")
      for (const c of spec.containers) {
        const argv: string[] = c.command ? c.args[0].split(/\s+/).slice(3) : c.args // "exec node bin/flotilla.ts launch …"
        const role = argv[1]
        expect(argv).toContain("nats://nats:4222")
        const mount = c.volumeMounts.find((m: any) => m.mountPath === "/var/run/flotilla")
        const vol = spec.volumes.find((v: any) => v.name === mount.name)
        expect(vol.secret.secretName).toBe(`flotilla-${job.job}-creds`)
        const keys = vol.secret.items.map((i: any) => i.key)
        if (role === "param-server") {
          expect(keys).toEqual(Array.from({ length: job.topology.psShards }, (_, k) => `${roleOfActor("param-server", k)}.nk`))
          expect(c.args[0]).toContain("--nkey /var/run/flotilla/ps-${HOSTNAME##*-}.nk")
        } else {
          expect(keys, c.name).toEqual([`${role}.nk`])
          expect(c.env).toContainEqual({ name: "NATS_NKEY", value: "/var/run/flotilla/nkey" })
        }
      }
    }
  })
})

describe("infra/k8s/nats.yaml (a 3-node JetStream cluster, as the NATS Helm chart lays it out)", () => {
  const docs = parseAllDocuments(readFileSync("infra/k8s/nats.yaml", "utf8")).map((d) => d.toJS())
  const sts = docs.find((d) => d.kind === "StatefulSet")
  const cm = docs.find((d) => d.kind === "ConfigMap")
  const conf: string = cm.data["nats.conf"]
  it("is a StatefulSet of 3 behind a headless Service, JetStream on a PVC, its config from a ConfigMap", () => {
    expect(sts.spec.replicas).toBe(3)
    const headless = docs.find((d) => d.kind === "Service" && d.metadata.name === sts.spec.serviceName)
    expect(headless.spec.clusterIP).toBe("None")
    expect(headless.spec.ports.map((p: any) => p.port)).toContain(6222)
    expect(sts.spec.volumeClaimTemplates[0].metadata.name).toBe("nats-js")
    const c = sts.spec.template.spec.containers[0]
    expect(c.volumeMounts).toContainEqual({ name: "nats-js", mountPath: "/data" })
    expect(conf).toMatch(/store_dir: \/data\/jetstream/)
    expect(c.args).toEqual(["--config", "/etc/nats-config/nats.conf"])
    expect(sts.spec.template.spec.volumes).toContainEqual({ name: "config", configMap: { name: cm.metadata.name } })
    // routes by DNS: every pod of the StatefulSet, through the headless Service, with the Secret's password
    for (const i of [0, 1, 2]) {
      expect(c.env).toContainEqual({ name: `ROUTE_URL_${i}`, value: `nats://route:$(ROUTE_PASSWORD)@${sts.metadata.name}-${i}.${headless.metadata.name}:6222` })
      expect(conf).toContain(`$ROUTE_URL_${i}`)
    }
    expect(c.env).toContainEqual({ name: "ROUTE_PASSWORD", valueFrom: { secretKeyRef: { name: "flotilla-nats-routes", key: "password" } } })
    expect(sts.spec.template.spec.volumes).toContainEqual({ name: "accounts", secret: { secretName: "flotilla-nats-accounts" } })
  })

  it("its config is valid for nats-server with the accounts `flotilla infra account` writes", () => {
    // the pod's layout: /etc/nats-config/nats.conf and /etc/nats-accounts/gpt.conf
    const root = join(tmp, "k8s")
    mkdirSync(join(root, "nats-config"), { recursive: true })
    mkdirSync(join(root, "nats-accounts"), { recursive: true })
    writeFileSync(join(root, "nats-config", "nats.conf"), conf)
    writeFileSync(join(root, "nats-accounts", "gpt.conf"), readFileSync(join(tmp, "gpt", "account.conf")))
    const url = (i: number) => `nats://route:pw@nats-${i}.nats-headless:6222`
    check(join(root, "nats-config", "nats.conf"), { SERVER_NAME: "nats-0", ROUTE_PASSWORD: "pw", ROUTE_URL_0: url(0), ROUTE_URL_1: url(1), ROUTE_URL_2: url(2) })
    expect(conf).not.toMatch(/no_auth_user/)
  })
})

describe("flotilla infra account --workers", () => {
  it("writes a user per named worker in place of the shared one, bound to its id and replica; nats-server takes it", () => {
    const dir = join(tmp, "members")
    const r = writeAccount("gpt", 2, dir, false, parseWorkers("worker-0, worker-0-s1@worker-0,worker-1"))
    expect([...r.seeds.keys()]).toContain("worker.worker-0-s1")
    expect([...r.seeds.keys()]).not.toContain("worker")
    expect(existsSync(join(dir, "worker.nk"))).toBe(false)
    expect(statSync(join(dir, workerSeedName("worker-1"))).mode & 0o777).toBe(0o600)
    const text = readFileSync(r.account, "utf8")
    expect(text).toContain('"flotilla.gpt.hb.worker.worker-0"')
    expect(text).toContain('"flotilla.gpt.ps.*.ack.worker-0"') // the stage hears its replica's acks
    expect(text).toContain('"flotilla.gpt.pipe.worker-0.*.fwd"')
    const userBlock = (title: string) => text.slice(text.indexOf(`# ${title}\n`), text.indexOf("} }", text.indexOf(`# ${title}\n`)))
    expect(userBlock("worker worker-1")).toContain('"flotilla.gpt.hb.worker.worker-1"')
    expect(userBlock("worker worker-1")).not.toContain('"flotilla.gpt.hb.worker.*"')
    expect(userBlock("worker worker-0-s1 (replica worker-0)")).toContain('"flotilla.gpt.hb.stage.worker-0-s1"')
    expect(text).toContain('"flotilla.gpt.hb.loader.*"') // the other roles as before
    writeFileSync(join(dir, "server.conf"), `accounts {\n  include ./account.conf\n}\n`)
    check(join(dir, "server.conf"))
    expect(() => parseWorkers("worker-0,worker 1")).toThrow(/"worker 1" is not ID or ID@REPLICA/)
    expect(() => parseWorkers("a,a")).toThrow(/names a twice/)
    expect(() => parseWorkers(",")).toThrow(/at least one/)
    expect(() => writeAccount("gpt", 2, dir, false, parseWorkers("worker-0"))).toThrow(/exists: pass --force/)
  })
})
