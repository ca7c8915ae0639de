import { expect, test } from "bun:test";
import { queueRefusals } from "../../src/engine/queue";

test("within_capacity_and_timeout_nobody_is_refused", () => {
  expect(queueRefusals([0, 10, 20], 100, 3, 1000)).toEqual({ timedOut: [], overflow: [] });
});

test("a_full_queue_refuses_the_newest_beyond_capacity_and_keeps_the_oldest", () => {
  expect(queueRefusals([0, 10, 20, 30, 40], 100, 2, 1000)).toEqual({ timedOut: [], overflow: [2, 3, 4] });
});

test("zero_capacity_refuses_every_request_that_could_not_start", () => {
  expect(queueRefusals([50, 60], 100, 0, 1000)).toEqual({ timedOut: [], overflow: [0, 1] });
});

test("a_request_waiting_longer_than_the_timeout_is_refused_and_one_at_exactly_the_timeout_is_not", () => {
  expect(queueRefusals([0, 100, 150], 1100, 10, 1000)).toEqual({ timedOut: [0], overflow: [] });
});

test("timed_out_requests_do_not_count_against_capacity", () => {
  // Two expired make room: the three others fit a capacity of 3.
  expect(queueRefusals([0, 1, 900, 950, 990], 1500, 3, 1000)).toEqual({ timedOut: [0, 1], overflow: [] });
  expect(queueRefusals([0, 1, 900, 950, 990], 1500, 2, 1000)).toEqual({ timedOut: [0, 1], overflow: [4] });
});
