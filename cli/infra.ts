/**
 * Implements: `flotilla infra` — what an operator needs to put a job on a shared,
 * secured nats-server (docs/SECURITY.md):
 *
 *   flotilla infra account <job> [--out DIR] [--shards K] [--workers ID,ID@REPLICA,…] [--force] [--env-refs]
 *       DIR/account.conf  the job's account block, one nkey user per role (public keys only):
 *                         include it inside the server config's `accounts { }`
 *       DIR/<role>.nk     each role's nkey seed, mode 0600 (`flotilla launch … --nkey FILE`)
 *       DIR/worker.<id>.nk with --workers: a user per named worker in place of worker.nk, bound
 *                         to its id (its heartbeats, its acks, its replica's pipeline)
 *       DIR/nkeys.env     FLOTILLA_<JOB>_<ROLE>_NKEY=U… for configs that name the keys as
 *                         variables (infra/nats/nats.conf, the Kubernetes ConfigMap)
 *   flotilla infra routes [--out FILE] [--force]
 *       FILE              FLOTILLA_ROUTE_PASSWORD and FLOTILLA_ROUTE_<i> (the route URLs with it),
 *                         mode 0600, for the cluster configs of infra/nats/cluster/
 *
 * Keys are made with nkeys.js (the ed25519 nkeys library nats.js ships with and exports as
 * `nkeys`): a user seed `SU…`, its public key `U…`. The permissions are
 * shared/bus/permissions.ts's. Existing seeds are kept unless --force (a rotation).
 * Does not own: the permissions, presenting a seed (shared/bus/nats.ts).
 */
import { randomBytes } from "node:crypto"
import { chmodSync, existsSync, mkdirSync, writeFileSync } from "node:fs"
import { dirname, join } from "node:path"
import { nkeys } from "nats"
import { loadJobFile } from "../shared/config/job.ts"
import { accountBlock, accountName, checkJobName, jobRoles, nkeyEnvVar, ROLE_PURPOSE, type JobRole, type Member } from "../shared/bus/permissions.ts"
import { isToken } from "../shared/protocol/subjects.ts"

export class InfraUsageError extends Error {
  readonly _tag = "InfraUsageError"
}

export interface InfraOptions {
  readonly command: string
  readonly args: ReadonlyArray<string>
  readonly out?: string
  readonly shards?: string
  readonly jobFile?: string
  readonly force?: boolean
  readonly envRefs?: boolean
  /** `--workers`: workers with a user each (parseWorkers) */
  readonly workers?: string
  /** where the report goes (default stdout). */
  readonly write?: (text: string) => void
}

export interface WrittenAccount {
  readonly dir: string
  readonly account: string
  /** each user's seed file, by role (or `worker.<id>` for a worker of its own) */
  readonly seeds: ReadonlyMap<string, string>
  readonly publicKeys: ReadonlyMap<string, string>
}

/** A new nkey user (nkeys.js): its seed (`SU…`) and public key (`U…`). */
export const newUserKey = (): { readonly seed: string; readonly publicKey: string } => {
  const kp = nkeys.createUser()
  return { seed: new TextDecoder().decode(kp.getSeed() as Uint8Array), publicKey: kp.getPublicKey() as string }
}

/** The seed file name of a worker with a user of its own. */
export const workerSeedName = (id: string): string => `worker.${id}.nk`

/**
 * `--workers worker-0,worker-1,worker-0-s1@worker-0`: workers with a user each (a pipeline
 * stage as `ID@REPLICA`, its replica being stage 0's id); each must be a subject token.
 */
export const parseWorkers = (spec: string): Member[] => {
  const out: Member[] = []
  for (const item of spec.split(",").map((x) => x.trim()).filter((x) => x !== "")) {
    const [id, replica, ...more] = item.split("@")
    if (more.length > 0 || !isToken(id) || (replica !== undefined && !isToken(replica))) {
      throw new InfraUsageError(`--workers: ${JSON.stringify(item)} is not ID or ID@REPLICA (1-64 of [A-Za-z0-9_-] each)`)
    }
    if (out.some((m) => m.id === id)) throw new InfraUsageError(`--workers names ${id} twice`)
    out.push(replica !== undefined && replica !== id ? { id, replica } : { id })
  }
  if (out.length === 0) throw new InfraUsageError("--workers needs at least one worker id")
  return out
}

/** Write `text` readable by its owner only (mode 0600, also when the file exists). */
export const secretFile = (file: string, text: string) => {
  writeFileSync(file, text, { mode: 0o600 })
  chmodSync(file, 0o600) // an existing file keeps its mode otherwise
}

const shardsOf = (o: InfraOptions): number => {
  if (o.shards !== undefined) {
    const k = Number(o.shards)
    if (!Number.isInteger(k) || k < 1 || k > 1024) throw new InfraUsageError(`--shards must be an integer in [1, 1024], got ${JSON.stringify(o.shards)}`)
    return k
  }
  return o.jobFile !== undefined ? loadJobFile(o.jobFile).topology.psShards : 1
}

/** The account block of `job` with its keys named as variables (infra/nats/nats.conf's form). */
export const envRefAccount = (job: string, shards: number): string =>
  accountBlock(job, jobRoles(shards).map((role) => ({ role, auth: { kind: "nkey" as const, nkey: `$${nkeyEnvVar(job, role)}` } })))

/** Write job `job`'s account and every role's seed into `dir`; existing seeds are reused unless `force`. */
export const writeAccount = (job: string, shards: number, dir: string, force = false, workers?: ReadonlyArray<Member>): WrittenAccount => {
  checkJobName(job)
  mkdirSync(dir, { recursive: true, mode: 0o700 })
  // with --workers, each named worker has a user of its own in place of the shared worker user
  const roles = jobRoles(shards).filter((r) => workers === undefined || r !== "worker")
  const users: Array<{ key: string; file: string; role: JobRole; member?: Member }> = [
    ...roles.map((role) => ({ key: role as string, file: join(dir, `${role}.nk`), role })),
    ...(workers ?? []).map((m) => ({ key: `worker.${m.id}`, file: join(dir, workerSeedName(m.id)), role: "worker" as const, member: m }))
  ]
  const seeds = new Map<string, string>()
  const publicKeys = new Map<string, string>()
  const existing = users.map((u) => u.file).find((f) => existsSync(f))
  if (existing !== undefined && !force) throw new InfraUsageError(`${existing} exists: pass --force to replace every seed in ${dir} (a key rotation), or choose another --out`)
  for (const u of users) {
    const key = newUserKey()
    secretFile(u.file, `${key.seed}\n`)
    seeds.set(u.key, u.file)
    publicKeys.set(u.key, key.publicKey)
  }
  const account = join(dir, "account.conf")
  writeFileSync(
    account,
    `# job ${job}: written by \`flotilla infra account ${job} --shards ${shards}${workers ? ` --workers ${workers.map((m) => (m.replica ? `${m.id}@${m.replica}` : m.id)).join(",")}` : ""}\`. No secrets here (public keys only).\n` +
      `# Include it inside the server config's accounts block:  accounts { include ./${job}/account.conf }\n` +
      accountBlock(job, users.map((u) => ({ role: u.role, auth: { kind: "nkey" as const, nkey: publicKeys.get(u.key)! }, ...(u.member ? { member: u.member } : {}) })))
  )
  writeFileSync(join(dir, "nkeys.env"), roles.map((role) => `${nkeyEnvVar(job, role)}=${publicKeys.get(role)}`).join("\n") + "\n")
  return { dir, account, seeds, publicKeys }
}

/** The route credentials of a cluster: one random password (hex: safe in a URL) and each node's route URL with it. */
export const routeEnv = (hosts: ReadonlyArray<string>, password = randomBytes(24).toString("hex")): string =>
  [`FLOTILLA_ROUTE_PASSWORD=${password}`, ...hosts.map((h, i) => `FLOTILLA_ROUTE_${i + 1}=nats-route://route:${password}@${h}:6222`)].join("\n") + "\n"

export const infraMain = (o: InfraOptions): void => {
  const write = o.write ?? ((t: string) => void process.stdout.write(t))
  switch (o.command) {
    case "account": {
      const [job, ...extra] = o.args
      if (job === undefined) throw new InfraUsageError("usage: flotilla infra account <job> [--out DIR] [--shards K]")
      if (extra.length > 0) throw new InfraUsageError(`infra account takes one job, got ${[job, ...extra].join(" ")}`)
      try {
        checkJobName(job)
      } catch (e) {
        throw new InfraUsageError((e as Error).message)
      }
      const shards = shardsOf(o)
      if (o.envRefs) return write(envRefAccount(job, shards))
      const dir = o.out ?? join("nats-accounts", job)
      const workers = o.workers !== undefined ? parseWorkers(o.workers) : undefined
      const r = writeAccount(job, shards, dir, o.force, workers)
      const purpose = (key: string) =>
        key.startsWith("ps-") ? ROLE_PURPOSE["ps-k"].replace(/\bk\b/g, key.slice(3)) : key.startsWith("worker.") ? `worker ${key.slice(7)} only (flotilla launch worker --id ${key.slice(7)})` : ROLE_PURPOSE[key]
      const width = Math.max(dir.length + 16, ...[...r.seeds.values()].map((f) => f.length + 1))
      const rows = [...r.seeds].map(([key, file]) => `  ${file.padEnd(width)} ${purpose(key)}`)
      write(
        [
          `account ${accountName(job)} of job ${job} (${shards} parameter-server shard${shards === 1 ? "" : "s"}): ${dir}`,
          `  ${r.account.padEnd(width)} the account (public keys): inside the server's accounts { }, then reload it (nats-server --signal reload)`,
          `  ${join(dir, "nkeys.env").padEnd(width)} the same keys as ${nkeyEnvVar(job, "worker").replace("_WORKER_", "_<ROLE>_")}=… variables`,
          ...rows,
          "",
          "Give each role its seed file only (mode 0600; a Kubernetes Secret, a compose secret):",
          `  flotilla launch worker --job JOB.yaml --nats nats://HOST:4222 --nkey ${join(dir, workers ? workerSeedName(workers[0].id) : "worker.nk")}${workers ? ` --id ${workers[0].id}` : ""}`,
          `  flotilla up JOB.yaml --nats nats://HOST:4222 --account ${dir}        (every process as its role)`,
          `  flotilla ctl ${job} status --nats nats://HOST:4222 --nkey ${join(dir, "observer.nk")}`,
          ""
        ].join("\n")
      )
      return
    }
    case "routes": {
      if (o.args.length > 0) throw new InfraUsageError(`infra routes takes no arguments, got ${o.args.join(" ")}`)
      const file = o.out ?? join("nats-accounts", "routes.env")
      if (existsSync(file) && !o.force) throw new InfraUsageError(`${file} exists: pass --force to make a new route password (restart every node)`)
      mkdirSync(dirname(file), { recursive: true, mode: 0o700 })
      secretFile(file, routeEnv(["nats-1", "nats-2", "nats-3"]))
      write(`route credentials for nats-1, nats-2, nats-3: ${file} (mode 0600); give it to every node's environment (infra/nats/cluster/README.md)\n`)
      return
    }
    default:
      throw new InfraUsageError(`unknown infra command ${JSON.stringify(o.command)}: account | routes`)
  }
}
