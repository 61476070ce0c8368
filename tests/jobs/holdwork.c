/* Fault injection, step 1: the gloo worker that ran work number HOLD_WORK keeps it (it is
 * descheduled) until HOLD_FLAG exists, i.e. until the script's main() has returned and
 * freed DDP, so the worker then drops the work's last reference itself.
 * Step 2 (SLOW_GIL_MS): the worker is descheduled again just before taking the GIL. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>
#define SYM "_ZN4c10d16ProcessGroupGloo9AsyncWork7executeERKN3c1013intrusive_ptrIS1_NS2_6detail34intrusive_target_default_null_typeIS1_EEEE"
static atomic_int count;
static __thread int last_k;
void _ZN4c10d16ProcessGroupGloo9AsyncWork7executeERKN3c1013intrusive_ptrIS1_NS2_6detail34intrusive_target_default_null_typeIS1_EEEE(void *work) {
  static void (*real)(void *);
  if (!real) {
    void *h = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
    real = (void (*)(void *))dlsym(h ? h : RTLD_NEXT, SYM);
  }
  real(work);
  int k = atomic_fetch_add(&count, 1) + 1;
  last_k = k;
  if (getenv("LOG_WORK")) fprintf(stderr, "[inject] work %d done\n", k);
  const char *at = getenv("HOLD_WORK"), *flag = getenv("HOLD_FLAG");
  const char *every = getenv("HOLD_EVERY_MS");
  if (every) usleep(atoi(every) * 1000);
  if (at && flag && k == atoi(at)) {
    fprintf(stderr, "[inject] worker keeps finished work %d until %s exists\n", k, flag);
    char path[512];
    snprintf(path, sizeof path, "%s.%s", flag, getenv("RANK") ? getenv("RANK") : "x");
    for (int i = 0; i < 2000 && access(path, F_OK) != 0; i++) usleep(5000);
  }
}
typedef struct _ts PyThreadState;
void PyEval_AcquireThread(PyThreadState *tstate) {
  static void (*real)(PyThreadState *);
  if (!real) real = (void (*)(PyThreadState *))dlsym(RTLD_NEXT, "PyEval_AcquireThread");
  char name[32] = {0};
  prctl(PR_GET_NAME, name, 0, 0, 0);
  const char *ms = getenv("SLOW_GIL_MS");
  if (getenv("LOG_GIL") && strcmp(name, "pt_gloo_runloop") == 0)
    fprintf(stderr, "[inject] %s takes the GIL after work %d\n", name, last_k);
  if (ms && strcmp(name, "pt_gloo_runloop") == 0) {
    fprintf(stderr, "[inject] %s is descheduled %s ms before taking the GIL\n", name, ms);
    usleep(atoi(ms) * 1000);
  }
  real(tstate);
}
