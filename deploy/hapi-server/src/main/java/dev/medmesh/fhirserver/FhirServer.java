package dev.medmesh.fhirserver;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.provider.IJpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import jakarta.persistence.EntityManagerFactory;
import java.util.Properties;
import javax.sql.DataSource;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.h2.jdbcx.JdbcConnectionPool;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

/**
 * The local stack's FHIR server: HAPI FHIR's JPA server for FHIR R4 on an H2 database in a folder,
 * served by an embedded Jetty at http://127.0.0.1:PORT/fhir. Arguments: the port, the database
 * folder (kept across restarts: an outage loses nothing the server had committed).
 *
 * <p>Plain Spring, no Spring Boot: HAPI's JPA configuration classes plus the few beans they expect
 * the application to provide (the database, the entity manager and its transactions, the storage
 * and partition settings, the paging provider). HAPI's defaults are kept but one: a reference to
 * a resource the server does not hold (the report's Patient, the Observations it was derived from,
 * which a hospital's server holds since the EHR wrote them) creates a placeholder of it instead of
 * refusing the report.
 */
public final class FhirServer {
  private static final String DATABASE_FOLDER = "medmesh.fhir.database";

  private FhirServer() {}

  public static void main(String[] args) throws Exception {
    long started = System.nanoTime();
    int port = Integer.parseInt(args[0]);
    System.setProperty(DATABASE_FOLDER, args[1]);
    AnnotationConfigApplicationContext spring = new AnnotationConfigApplicationContext(Beans.class);
    RestfulServer fhir = restfulServer(spring);

    Server jetty = new Server();
    ServerConnector connector = new ServerConnector(jetty);
    connector.setHost("127.0.0.1"); // loopback only: a developer's test server, no auth
    connector.setPort(port);
    jetty.addConnector(connector);
    ServletContextHandler context = new ServletContextHandler();
    context.setContextPath("/");
    context.addServlet(new ServletHolder(fhir), "/fhir/*");
    jetty.setHandler(context);
    jetty.setStopAtShutdown(true); // SIGTERM: stop serving, then H2 closes its files
    jetty.start();
    System.out.printf(
        "medmesh-fhir-server ready on http://127.0.0.1:%d/fhir in %.1f s%n",
        port, (System.nanoTime() - started) / 1e9);
    System.out.flush();
    jetty.join();
    spring.close();
  }

  private static RestfulServer restfulServer(AnnotationConfigApplicationContext spring) {
    IFhirSystemDao<?, ?> systemDao = spring.getBean(IFhirSystemDao.class);
    RestfulServer server = new RestfulServer(systemDao.getContext());
    server.registerProviders(spring.getBean(ResourceProviderFactory.class).createProviders());
    // The system provider serves transactions (POST [base] with a transaction Bundle).
    server.registerProvider(spring.getBean(IJpaSystemProvider.class));
    server.setPagingProvider(spring.getBean(DatabaseBackedPagingProvider.class));
    return server;
  }

  /** The beans HAPI's JPA configuration expects from the application. */
  @Configuration
  @Import({
    JpaR4Config.class,
    HapiJpaConfig.class,
    JpaBatch2Config.class,
    Batch2JobsConfig.class,
    SubscriptionChannelConfig.class,
    ThreadPoolFactoryConfig.class
  })
  public static class Beans {
    @Bean
    public DataSource dataSource() {
      String folder = System.getProperty(DATABASE_FOLDER);
      return JdbcConnectionPool.create("jdbc:h2:file:" + folder + "/fhir", "sa", "");
    }

    @Bean
    public JpaStorageSettings storageSettings() {
      JpaStorageSettings settings = new JpaStorageSettings();
      settings.setAutoCreatePlaceholderReferenceTargets(true);
      return settings;
    }

    @Bean
    public PartitionSettings partitionSettings() {
      return new PartitionSettings();
    }

    @Bean
    public DatabaseBackedPagingProvider databaseBackedPagingProvider() {
      return new DatabaseBackedPagingProvider();
    }

    @Bean
    @Primary
    public LocalContainerEntityManagerFactoryBean entityManagerFactory(
        ConfigurableListableBeanFactory beans,
        FhirContext fhirContext,
        JpaStorageSettings storageSettings,
        DataSource dataSource) {
      LocalContainerEntityManagerFactoryBean factory =
          HapiEntityManagerFactoryUtil.newEntityManagerFactory(beans, fhirContext, storageSettings);
      factory.setPersistenceUnitName("HAPI_PU");
      factory.setDataSource(dataSource);
      Properties jpa = new Properties();
      jpa.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
      jpa.put("hibernate.hbm2ddl.auto", "update");
      jpa.put("hibernate.search.enabled", "false"); // no full-text index: searches use SQL
      factory.setJpaProperties(jpa);
      return factory;
    }

    @Bean
    @Primary
    public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
      JpaTransactionManager manager = new JpaTransactionManager();
      manager.setEntityManagerFactory(entityManagerFactory);
      return manager;
    }
  }
}
