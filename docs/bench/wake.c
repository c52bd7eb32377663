// What one write() costs the writer, and the reader it wakes, by where the reader sleeps: on the
// writer's vCPU or on the other one (README, "What a wake-up costs here"). The reader blocks in
// read() on a pipe; the writer sleeps between writes, as a proxy does between events at 1000
// requests a second, so the reader's vCPU has gone idle by the time the byte arrives.
//   gcc -O2 -o wake docs/bench/wake.c
//   ./wake 20000 0 1 300; ./wake 20000 0 0 300; ./wake 20000 0 1 0
// Arguments: writes, the writer's CPU, the reader's, the writer's pause before each write (µs).
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
static void pin(int cpu) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu, &s); sched_setaffinity(0, sizeof s, &s); }
static double thread_cpu(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
  if (argc < 5) { fprintf(stderr, "usage: wake WRITES WRITER_CPU READER_CPU PAUSE_US\n"); return 2; }
  int n = atoi(argv[1]), a = atoi(argv[2]), b = atoi(argv[3]), pause_us = atoi(argv[4]);
  int p[2]; char c = 0;
  if (pipe(p)) return 1;
  pid_t pid = fork();
  if (pid == 0) { pin(b); for (int i = 0; i < n; i++) if (read(p[0], &c, 1) != 1) _exit(1); _exit(0); }
  pin(a);
  double in_write = 0;
  for (int i = 0; i < n; i++) {
    if (pause_us) usleep(pause_us);
    double s = thread_cpu();
    if (write(p[1], &c, 1) != 1) return 1;
    in_write += thread_cpu() - s;
  }
  waitpid(pid, 0, 0);
  struct rusage kids; getrusage(RUSAGE_CHILDREN, &kids);
  double reader = kids.ru_utime.tv_sec + kids.ru_utime.tv_usec / 1e6 + kids.ru_stime.tv_sec + kids.ru_stime.tv_usec / 1e6;
  printf("writer on cpu %d, reader on cpu %d, pause %d us: the writer spends %.1f us per waking write, the reader %.1f us per wake\n",
         a, b, pause_us, in_write / n * 1e6, reader / n * 1e6);
  return 0;
}
