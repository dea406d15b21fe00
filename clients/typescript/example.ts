// How a frontend uses the generated types (README: "TypeScript client").
// Type-checked in CI against schema.d.ts (scripts/ci/openapi.sh), so it
// breaks when the API changes in a way this code would not survive.
import type { components, paths } from "./schema";

export type Problem = components["schemas"]["Problem"];
export type Class = components["schemas"]["Class"];
export type TipReceived = components["schemas"]["RealtimeTipReceived"];
export type BalanceUpdated = components["schemas"]["RealtimeBalanceUpdated"];

type TipBody = paths["/api/v1/tips"]["post"]["requestBody"]["content"]["application/json"];
type TipCreated =
  paths["/api/v1/tips"]["post"]["responses"][201]["content"]["application/json"];
type ClassQuery = NonNullable<paths["/api/v1/classes"]["get"]["parameters"]["query"]>;
type ClassPage =
  paths["/api/v1/classes"]["get"]["responses"][200]["content"]["application/json"];

/** Every non-2xx answer is an RFC 9457 problem (application/problem+json). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly problem: Problem,
    /** Seconds from Retry-After (429, some 503s). */
    readonly retryAfter: number | undefined,
  ) {
    super(`${problem.code}: ${problem.detail ?? problem.title}`);
  }
}

async function call<T>(base: string, token: string, path: string, init: RequestInit = {}): Promise<T> {
  const headers = new Headers(init.headers);
  headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(new URL(path, base), { ...init, headers });
  if (!response.ok) {
    const problem = (await response.json()) as Problem;
    const retry = response.headers.get("Retry-After");
    throw new ApiError(response.status, problem, retry === null ? undefined : Number(retry));
  }
  return (await response.json()) as T;
}

/** Tips a creator. Reuse `idempotencyKey` when retrying the same tip. */
export function tip(base: string, token: string, body: TipBody, idempotencyKey: string) {
  return call<TipCreated>(base, token, "/api/v1/tips", {
    method: "POST",
    headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey },
    body: JSON.stringify(body),
  });
}

/** One page of upcoming classes; pass `next_cursor` back as `cursor`. */
export function listClasses(base: string, token: string, query: ClassQuery = {}) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(query)) {
    if (value !== undefined && value !== null) params.set(name, String(value));
  }
  return call<ClassPage>(base, token, `/api/v1/classes?${params}`);
}

/** A realtime message's `data`, by message name (Ably channel `user:{id}`). */
export function onUserMessage(name: string, data: unknown): string {
  if (name === "tip.received") {
    const tip = data as TipReceived;
    return `${tip.amount} tokens from ${tip.from}`;
  }
  if (name === "balance.updated") {
    return `balance ${(data as BalanceUpdated).balance}`;
  }
  return name;
}
