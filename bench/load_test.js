// The seed's load scenario for k6 users: `k6 run -e BASE_URL=http://127.0.0.1:8000 -e TOKEN=... bench/load_test.js`.
// `make bench-load` runs the same scenario with locust (bench/locustfile.py), which installs here;
// both read the ramp and the targets from bench/load_stages.json.
import http from 'k6/http';
import { check, sleep } from 'k6';

const config = JSON.parse(open('./load_stages.json'));
const BASE_URL = __ENV.BASE_URL || 'http://127.0.0.1:8000';
const HEADERS = { Authorization: `Bearer ${__ENV.TOKEN}`, 'Content-Type': 'application/json' };

export const options = {
  stages: config.stages.map((s) => ({ duration: `${s.duration_s}s`, target: s.target })),
  thresholds: {
    http_req_duration: [
      `p(50)<${config.thresholds.p50_ms}`,
      `p(95)<${config.thresholds.p95_ms}`,
      `p(99)<${config.thresholds.p99_ms}`,
    ],
    http_req_failed: [`rate<${config.thresholds.error_rate}`],
  },
};

export default function () {
  const list = http.get(`${BASE_URL}/api/v1/features?page=1&page_size=20`, { headers: HEADERS });
  check(list, { 'list 200': (r) => r.status === 200 });

  const body = JSON.stringify({ name: `load feature ${__VU}-${__ITER}`, complexity_points: __ITER % 13 });
  const created = http.post(`${BASE_URL}/api/v1/features`, body, { headers: HEADERS });
  check(created, { 'create 201': (r) => r.status === 201 });

  sleep(1);
}
