// Pipe ping-pong between two processes: wall time and CPU (both processes) per round trip,
// with the two on one vCPU or on two, back to back or each round trip starting from idle.
// What a wake-up costs on this machine (README, "What a wake-up costs here"):
//   gcc -O2 -o pingpong docs/bench/pingpong.c
//   ./pingpong 200000 0 0; ./pingpong 200000 0 1; ./pingpong 20000 0 1 300; ./pingpong 20000 0 0 300
// Arguments: round trips, the first process's CPU, the second's, and optionally a pause in
// microseconds after each round trip (its timer wake-up is counted in the CPU too).
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static void pin(int cpu) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu, &s); sched_setaffinity(0, sizeof s, &s); }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
  int n = atoi(argv[1]), a = atoi(argv[2]), b = atoi(argv[3]), gap_us = argc > 4 ? atoi(argv[4]) : 0;
  int p1[2], p2[2]; char c = 0;
  if (pipe(p1) || pipe(p2)) return 1;
  pid_t pid = fork();
  if (pid == 0) { pin(b); for (int i = 0; i < n; i++) { if (read(p1[0], &c, 1) != 1 || write(p2[1], &c, 1) != 1) _exit(1); } _exit(0); }
  pin(a);
  double t0 = now(), busy = 0;
  for (int i = 0; i < n; i++) {
    double s = now();
    if (write(p1[1], &c, 1) != 1 || read(p2[0], &c, 1) != 1) return 1;
    busy += now() - s;
    if (gap_us) usleep(gap_us);
  }
  double wall = now() - t0;
  waitpid(pid, 0, 0);
  struct rusage self, kids; getrusage(RUSAGE_SELF, &self); getrusage(RUSAGE_CHILDREN, &kids);
  double cpu = self.ru_utime.tv_sec + self.ru_utime.tv_usec / 1e6 + self.ru_stime.tv_sec + self.ru_stime.tv_usec / 1e6
             + kids.ru_utime.tv_sec + kids.ru_utime.tv_usec / 1e6 + kids.ru_stime.tv_sec + kids.ru_stime.tv_usec / 1e6;
  printf("cpus %d,%d gap %d us: round trip %.1f us, CPU %.1f us per round trip (wall %.2f s)\n", a, b, gap_us, busy / n * 1e6, cpu / n * 1e6, wall);
  return 0;
}
