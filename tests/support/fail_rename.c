/* An LD_PRELOAD fault injector for tests/faults.rs: makes chosen rename(2) calls fail with EIO,
 * so that a file swap can fail on one file and the restore of another file it already wrote
 * can fail too (an I/O error at the worst moment, deterministically).
 *
 * LUNAFRONT_FAIL_RENAME="suffix@N,suffix@N…": the N-th and later renames onto a path ending
 * with `suffix` fail (N counted from 1, per suffix, in this process). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int counts[16];

static int should_fail(const char *newpath) {
    const char *spec = getenv("LUNAFRONT_FAIL_RENAME");
    if (!spec || !newpath) return 0;
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", spec);
    int index = 0;
    for (char *save = NULL, *item = strtok_r(buf, ",", &save); item && index < 16;
         item = strtok_r(NULL, ",", &save), index++) {
        char *at = strrchr(item, '@');
        if (!at) continue;
        *at = '\0';
        int from = atoi(at + 1);
        size_t n = strlen(newpath), m = strlen(item);
        if (m <= n && strcmp(newpath + n - m, item) == 0) {
            counts[index]++;
            if (counts[index] >= from) return 1;
        }
    }
    return 0;
}

int rename(const char *oldpath, const char *newpath) {
    static int (*real)(const char *, const char *);
    if (!real) real = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    if (should_fail(newpath)) {
        errno = EIO;
        return -1;
    }
    return real(oldpath, newpath);
}
