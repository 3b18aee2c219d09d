package dev.medmesh.validator;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.ConceptValidationOptions;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.context.support.ValidationSupportContext;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Arrays;
import java.util.Map;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;

/**
 * Validates FHIR JSON files with HAPI's instance validator, offline: the core definitions of one
 * FHIR version from the validation-resources jar, in-memory terminology and the common code
 * systems (UCUM, BCP-47, MIME types...), and no remote terminology server.
 *
 * <p>Usage: {@code ValidateFiles R4|R4B|R5 file.json...}. Prints one JSON line per file,
 * {@code {"file": ..., "issues": [{"severity", "location", "message", "id"}...], "ms": ...}}, every
 * message the validator gave and the milliseconds its validation took (the first file of a run also
 * pays for loading the version's definitions). Codes HL7 added to its terminology (THO) after the core packages were
 * published are known through {@link NewerTerminology}. One run validates many files because starting the JVM and loading a
 * version's definitions takes most of the time. Exit status 0 when every file was read (whatever
 * the validator found: the caller judges the issues), 2 on bad arguments.
 */
public final class ValidateFiles {
  private ValidateFiles() {}

  public static void main(String[] args) throws IOException {
    if (args.length < 1) {
      System.err.println("usage: ValidateFiles R4|R4B|R5 file.json...");
      System.exit(2);
    }
    FhirContext context = contextFor(args[0]);
    if (context == null) {
      System.err.println("ValidateFiles: unknown FHIR version " + args[0] + " (R4, R4B or R5)");
      System.exit(2);
    }
    ValidationSupportChain chain =
        new ValidationSupportChain(
            new NewerTerminology(context),
            new DefaultProfileValidationSupport(context),
            new InMemoryTerminologyServerValidationSupport(context),
            new CommonCodeSystemsTerminologyService(context),
            new SnapshotGeneratingValidationSupport(context));
    FhirInstanceValidator instanceValidator = new FhirInstanceValidator(chain);
    // A profile named in meta.profile that is not among the core definitions (an IG's, such as
    // the Subscriptions Backport's) cannot be fetched offline: a warning that it was not checked,
    // as an unknown code system is, rather than an error about the instance.
    instanceValidator.setErrorForUnknownProfiles(false);
    FhirValidator validator = context.newValidator();
    validator.registerValidatorModule(instanceValidator);

    PrintStream out = new PrintStream(System.out, true, StandardCharsets.UTF_8);
    for (String name : Arrays.copyOfRange(args, 1, args.length)) {
      StringBuilder line = new StringBuilder("{\"file\":").append(quote(name)).append(",\"issues\":[");
      String text;
      try {
        text = Files.readString(Path.of(name), StandardCharsets.UTF_8);
      } catch (IOException e) {
        // The file's result says it could not be read, so one bad path does not hide the rest.
        line.append(issue("fatal", "", "cannot read the file: " + e, "medmesh-read")).append("]}");
        out.println(line);
        continue;
      }
      long started = System.nanoTime();
      ValidationResult result = validator.validateWithResult(text);
      long elapsedMs = (System.nanoTime() - started) / 1_000_000;
      boolean first = true;
      for (SingleValidationMessage message : result.getMessages()) {
        if (!first) {
          line.append(',');
        }
        first = false;
        line.append(
            issue(
                message.getSeverity().getCode(),
                message.getLocationString(),
                message.getMessage(),
                message.getMessageId()));
      }
      out.println(line.append("],\"ms\":").append(elapsedMs).append('}'));
    }
  }

  /**
   * Codes of HL7 Terminology (THO) code systems that are newer than the copy of the code system the
   * core package bundles: the online validator reads the current THO package and knows them, this
   * offline one would call them unknown codes (an error). Each entry names the THO release that
   * added it; every other code of these systems is still checked against the bundled copy.
   */
  static final class NewerTerminology implements IValidationSupport {
    private static final String V3_OBSERVATION_VALUE =
        "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
    // system -> code -> display. AIAST (AI Transparency on FHIR's label) entered v3-ObservationValue
    // in THO 6.0.0 (HL7/UTG, "add two prov codes", 2024-02-28); R4B (2022) and R5 (March 2023)
    // bundle the earlier 3.0.0 copy without it.
    private static final Map<String, Map<String, String>> CODES =
        Map.of(V3_OBSERVATION_VALUE, Map.of("AIAST", "Artificial Intelligence asserted"));

    private final FhirContext context;

    NewerTerminology(FhirContext context) {
      this.context = context;
    }

    @Override
    public FhirContext getFhirContext() {
      return context;
    }

    @Override
    public String getName() {
      return "medmesh newer THO codes";
    }

    @Override
    public boolean isCodeSystemSupported(ValidationSupportContext support, String system) {
      return CODES.containsKey(system);
    }

    @Override
    public CodeValidationResult validateCode(
        ValidationSupportContext support,
        ConceptValidationOptions options,
        String system,
        String code,
        String display,
        String valueSetUrl) {
      // Membership of a value set is left to the bundled value sets; only the code's existence
      // in its code system is answered here, and only for the listed codes (null: ask the next).
      if (valueSetUrl != null) {
        return null;
      }
      String known = CODES.getOrDefault(system, Map.of()).get(code);
      if (known == null) {
        return null;
      }
      CodeValidationResult result = new CodeValidationResult().setCode(code).setDisplay(known);
      if (display != null && !display.equalsIgnoreCase(known)) {
        result
            .setSeverity(IssueSeverity.WARNING)
            .setMessage("Wrong display '" + display + "' for " + system + "#" + code + ": '" + known + "'");
      }
      return result;
    }
  }

  private static FhirContext contextFor(String version) {
    switch (version) {
      case "R4":
        return FhirContext.forR4();
      case "R4B":
        return FhirContext.forR4B();
      case "R5":
        return FhirContext.forR5();
      default:
        return null;
    }
  }

  private static String issue(String severity, String location, String message, String id) {
    return "{\"severity\":"
        + quote(severity)
        + ",\"location\":"
        + quote(location)
        + ",\"message\":"
        + quote(message)
        + ",\"id\":"
        + quote(id)
        + "}";
  }

  private static String quote(String value) {
    if (value == null) {
      return "null";
    }
    StringBuilder out = new StringBuilder("\"");
    for (int i = 0; i < value.length(); i++) {
      char c = value.charAt(i);
      switch (c) {
        case '"':
          out.append("\\\"");
          break;
        case '\\':
          out.append("\\\\");
          break;
        case '\n':
          out.append("\\n");
          break;
        case '\r':
          out.append("\\r");
          break;
        case '\t':
          out.append("\\t");
          break;
        default:
          if (c < 0x20) {
            out.append(String.format("\\u%04x", (int) c));
          } else {
            out.append(c);
          }
      }
    }
    return out.append('"').toString();
  }
}
